"""Every example script runs end to end on a tiny slice of the real data (one epoch, 64 samples).

Keeps examples/ working in CI; the published numbers are measured by experiments/run_matrix.py
(docs/results.md) with the same evaluation (crmt_plugin.benchmark). A minute or two on one CPU core.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

# numpy, tqdm, matplotlib and the data carriers are test dependencies (scripts/install.sh installs
# them): a missing one fails these tests loudly rather than skipping the examples.

TINY = ["--epochs", "1", "--limit", "64", "--eval-steps", "2", "--eval-restarts", "1", "--queries", "20", "--quiet"]
SCRIPTS = ["jt", "crmt_jt", "pgd_at", "crmt_at", "trades", "crmt_trades", "mixup", "crmt_mix", "lip_jt", "crmt_lip"]
COLUMNS = ("clean", "pgd_joint", "worst_joint", "pgd:audio", "pgd:image", "missing:audio", "missing:image",
           "certified_empirical", "gradient_free", "mean_robust")


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_script_runs_and_saves(script, tmp_path):
    import torch

    out = tmp_path / script
    metrics = importlib.import_module(script).main(TINY + ["--train-steps", "1", "--out", str(out)])
    model = torch.load(out / "model.pt", weights_only=False)  # the plain module, not a state dict
    assert isinstance(model, torch.nn.Module)
    assert all(type(m).__name__ != "CRMTHead" for m in model.modules())
    saved = json.loads((out / "metrics.json").read_text())
    summary = saved["summary"]
    for column in COLUMNS:
        assert 0.0 <= summary[column] <= 1.0, (column, summary)
    assert summary["worst_joint"] <= min(summary["pgd_joint"], summary["pgd:audio"], summary["pgd:image"]) + 1e-9
    assert saved["val_accuracy"] >= 0.0 and saved["best_epoch"] == 1
    if script.startswith("crmt"):
        assert (out / "crmt.pt").is_file()
        assert saved["step2"]["mean_radius_after"] >= 0.0
    assert metrics["summary"] == summary
    if script.endswith("lip"):  # Lipschitz-bounded encoders: the sound certificate exists
        assert "certified_sound_note" not in saved["row"] and 0.0 <= saved["row"]["certified_sound"] <= 1.0


def test_mfeat_six_views(tmp_path):
    metrics = importlib.import_module("crmt_jt").main(TINY + ["--dataset", "mfeat", "--out", str(tmp_path)])
    assert {f"missing:{v}" for v in ("fou", "fac", "kar", "pix", "zer", "mor")} <= set(metrics["summary"])


def test_example_on_a_benchmark_file(tmp_path):
    """--data FILE.npz: the crmt-benchmark model (standardisation inside) trained by the example loop."""
    import numpy as np

    g = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "t.npz", x_u=(g.normal(size=(60, 5)) + y[:, None]).astype(np.float32),
             x_v=(g.normal(size=(60, 2, 6)) + y[:, None, None]).astype(np.float32), y=y)
    metrics = importlib.import_module("crmt_jt").main(
        ["--data", str(tmp_path / "t.npz"), "--epochs", "2", "--batch-size", "8", "--eval-steps", "2",
         "--eval-restarts", "1", "--queries", "10", "--quiet", "--out", str(tmp_path / "run")])
    assert {"missing:u", "missing:v", "pgd:u", "pgd:v"} <= set(metrics["summary"])


def test_crmt_differs_from_its_baseline_only_in_a_few_lines():
    """The advertisement in docs/examples.md: the CRMT version of a loop is the baseline plus a few lines."""
    import difflib

    for base, variant in [("jt", "crmt_jt"), ("pgd_at", "crmt_at"), ("trades", "crmt_trades"), ("mixup", "crmt_mix"),
                          ("lip_jt", "crmt_lip")]:
        def code(name):
            text = open(os.path.join(EXAMPLES, f"{name}.py")).read()
            return text.split('"""', 2)[2].splitlines()  # without the docstring

        diff = [d for d in difflib.unified_diff(code(base), code(variant), lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        assert len(diff) <= 20, (base, variant, diff)


def test_quickstart_runs(tmp_path, capsys):
    importlib.import_module("quickstart").main(["--epochs", "1", "--limit", "64", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "missing:audio" in printed and "certified_empirical" in printed and "worst_joint" in printed
    assert (tmp_path / "quickstart.png").stat().st_size > 0


def test_experiment_drivers_left_examples():
    """examples/ holds the copyable scripts; the drivers that regenerate docs live in experiments/."""
    assert not os.path.exists(os.path.join(EXAMPLES, "results.py"))
    assert not os.path.exists(os.path.join(EXAMPLES, "sound_certification.py"))
    root = os.path.dirname(EXAMPLES)
    for name in ("run_matrix.py", "make_datasets.py", "sound_certification.py"):
        assert os.path.isfile(os.path.join(root, "experiments", name))
