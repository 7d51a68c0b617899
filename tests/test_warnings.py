"""Every warning the library raises names the caller's file and line, never crmt_plugin's.

One case per public entry point that warns: step 2 refusing epochs (the wrapper's method and the
module function), the progress-bar fallback without tqdm (Lipschitz estimation, step 2, the evaluation
runner), the benchmark's figure without matplotlib and its radius search on a model at chance. A
static check makes sure no module calls ``warnings.warn`` itself (they go through
``crmt_plugin.errors.warn``).
"""

from __future__ import annotations

import pathlib
import sys
import warnings

import pytest
import torch
from torch import nn

import crmt_plugin
from crmt_plugin import CRMTWrapper
from crmt_plugin.errors import warn
from crmt_plugin.integration import fit_integration
from crmt_plugin.models import LateFusionNet

K = 4
LIP = {"p": 1.0, "q": 1.0}
PACKAGE = pathlib.Path(crmt_plugin.__file__).parent


def refusing_step2():
    """A wrapper and data on which step 2 refuses epochs (tests/test_integration.py's toy): a majority
    group where modality p is right and q wrong, a minority group the other way round; shrinking
    a^(q) grows the mean radius but gives up the minority, which the accuracy constraint refuses."""
    model = LateFusionNet({"p": nn.Identity(), "q": nn.Identity()}, {"p": K, "q": K}, K).double()
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.cat([torch.eye(K), torch.eye(K)], 1))
        model.fusion.fc.bias.zero_()
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"p": K, "q": K})
    n_a, n_b = 30, 4
    y = torch.arange(n_a + n_b) % K
    right = nn.functional.one_hot(y, K).double()
    wrong = nn.functional.one_hot((y + 1) % K, K).double()
    p = torch.cat([4 * right[:n_a], wrong[n_a:]])
    q = torch.cat([wrong[:n_a], 3 * right[n_a:]])
    return crmt, [({"p": p, "q": q}, y)]


def recorded(fn, match: str):
    """The warnings whose message contains ``match`` that ``fn()`` raised (``fn`` is a lambda defined in
    this file, so the caller's line is here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    found = [w for w in caught if match in str(w.message)]
    assert found, f"no warning matching {match!r}; got {[str(w.message)[:80] for w in caught]}"
    return found


def assert_points_here(found):
    for w in found:
        assert pathlib.Path(w.filename).resolve() == pathlib.Path(__file__).resolve(), (w.filename, w.lineno)
        assert w.lineno > 0


def test_step2_refusal_names_the_callers_line():
    crmt, data = refusing_step2()
    found = recorded(lambda: crmt.fit_integration(data, lipschitz=LIP, epochs=20, lr=0.1), "refused")
    assert_points_here(found)


def test_step2_module_function_names_the_callers_line():
    crmt, data = refusing_step2()
    found = recorded(lambda: fit_integration(crmt, data, lipschitz=LIP, epochs=20, lr=0.1), "refused")
    assert_points_here(found)


def test_the_exact_line_is_reported():
    crmt, data = refusing_step2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        crmt.fit_integration(data, lipschitz=LIP, epochs=20, lr=0.1)
    refused = [w for w in caught if "refused" in str(w.message)]
    assert [w.lineno for w in refused] == [line]


def test_warnings_are_errors_at_the_users_module_under_a_filter():
    # `-W error::UserWarning:<the user's module>` (or filterwarnings("error", module=...)) catches them
    crmt, data = refusing_step2()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=__name__)
        with pytest.raises(UserWarning, match="refused"):
            crmt.fit_integration(data, lipschitz=LIP, epochs=20, lr=0.1)


@pytest.fixture
def no_tqdm(monkeypatch):
    """tqdm made unimportable for the test (``import tqdm.auto`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


def linear_late_fusion(seed=0):
    torch.manual_seed(seed)
    model = LateFusionNet({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}, {"a": 4, "b": 4}, 3)
    x = {"a": torch.randn(8, 3), "b": torch.randn(8, 2)}
    return model, [(x, torch.arange(8) % 3)]


def test_progress_fallback_in_estimate_lipschitz_names_the_callers_line(no_tqdm):
    model, loader = linear_late_fusion()
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"a": 4, "b": 4})
    assert_points_here(recorded(lambda: crmt.estimate_lipschitz(loader, progress=True), "tqdm"))


def test_progress_fallback_in_step2_names_the_callers_line(no_tqdm):
    model, loader = linear_late_fusion()
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"a": 4, "b": 4})
    lip = crmt.estimate_lipschitz(loader)
    assert_points_here(recorded(lambda: crmt.fit_integration(loader, lipschitz=lip, epochs=1, progress=True),
                                "tqdm"))


def test_progress_fallback_in_evaluation_names_the_callers_line(no_tqdm):
    from crmt_plugin.attacks import FGM
    from crmt_plugin.evaluation import evaluate_robustness

    model, loader = linear_late_fusion()
    found = recorded(lambda: evaluate_robustness(model, loader, attacks={"FGM": FGM(0.1)}, radii=[0.1],
                                                 missing=False, progress=True), "tqdm")
    assert_points_here(found)


def test_benchmark_figure_without_matplotlib_names_the_callers_line(monkeypatch, tmp_path):
    from crmt_plugin.benchmark.report import plot_robustness

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    found = recorded(lambda: plot_robustness(str(tmp_path / "robustness.png"), {}), "robustness.png not written")
    assert_points_here(found)
    assert not (tmp_path / "robustness.png").exists()


def test_benchmark_radius_search_at_chance_names_the_callers_line():
    from crmt_plugin.benchmark import EvalConfig, find_radius
    from crmt_plugin.benchmark.data import BenchmarkData

    class AlwaysZero(nn.Module):  # predicts class 0; every label is 1: accuracy 0 <= the 0.45 target
        def forward(self, a, b):
            return torch.stack([a.sum(1) * 0 + 1, a.sum(1) * 0], dim=1) + 0 * b.sum(1, keepdim=True)

    n = 12
    data = BenchmarkData(x={"a": torch.randn(n, 3), "b": torch.randn(n, 2)}, y=torch.ones(n, dtype=torch.long),
                         split=torch.tensor([0] * 6 + [1] * 6), num_classes=2)
    found = recorded(lambda: find_radius([AlwaysZero()], data, EvalConfig(), iterations=1, max_samples=6),
                     "already below")
    assert_points_here(found)


def test_warn_helper_reports_the_first_frame_outside_the_package():
    found = recorded(lambda: warn("direct"), "direct")
    assert_points_here(found)


def test_no_module_calls_warnings_warn_directly():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "warnings.warn(" in code or "warn_explicit(" in code:
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "use crmt_plugin.errors.warn, which reports the caller's line:\n" + "\n".join(offenders)


def test_a_warning_from_code_read_from_stdin_is_shown_not_raised(tmp_path):
    """`python - < script.py` (and notebooks' __main__): warn must not ask a BuiltinImporter for the source."""
    import subprocess
    import sys

    code = "from crmt_plugin.errors import warn\nwarn('from stdin')\nprint('after')\n"
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "after" in done.stdout and "<stdin>:2: UserWarning: from stdin" in done.stderr
