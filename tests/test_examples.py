"""Every example script runs end to end on a tiny slice of the real data (one epoch, 64 samples).

Keeps examples/ working in CI; the numbers themselves are measured by examples/results.py
(docs/results.md). The whole file takes well under a minute on one CPU core.
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

TINY = ["--epochs", "1", "--limit", "64", "--radii", "1", "--cert-radii", "0.5", "--eval-steps", "2", "--quiet"]
SCRIPTS = ["jt", "crmt_jt", "pgd_at", "crmt_at", "trades", "crmt_trades", "mixup", "crmt_mix"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_script_runs_and_saves(script, tmp_path):
    out = tmp_path / script
    metrics = importlib.import_module(script).main(TINY + ["--train-steps", "1", "--out", str(out)])
    assert (out / "model.pt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    summary = saved["summary"]
    for column in ("clean", "FGM 1", "PGD 1", "PGD audio 1", "PGD image 1", "missing audio", "missing image",
                   "cert 0.5"):
        assert 0.0 <= summary[column] <= 1.0, (column, summary)
    assert saved["val_accuracy"] >= 0.0 and saved["best_epoch"] == 1
    if script.startswith("crmt"):
        assert (out / "crmt.pt").is_file()
        assert saved["step2"]["mean_radius_after"] >= saved["step2"]["mean_radius_before"]
    assert metrics["summary"] == summary


def test_mfeat_six_views(tmp_path):
    metrics = importlib.import_module("crmt_jt").main(TINY + ["--dataset", "mfeat", "--out", str(tmp_path)])
    assert {f"missing {v}" for v in ("fou", "fac", "kar", "pix", "zer", "mor")} <= set(metrics["summary"])


def test_crmt_differs_from_its_baseline_only_in_a_few_lines():
    """The advertisement in docs/examples.md: the CRMT version of a loop is the baseline plus a few lines."""
    import difflib

    for base, variant in [("jt", "crmt_jt"), ("pgd_at", "crmt_at"), ("trades", "crmt_trades"), ("mixup", "crmt_mix")]:
        def code(name):
            text = open(os.path.join(EXAMPLES, f"{name}.py")).read()
            return text.split('"""', 2)[2].splitlines()  # without the docstring

        diff = [d for d in difflib.unified_diff(code(base), code(variant), lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        assert len(diff) <= 20, (base, variant, diff)


def test_quickstart_runs(tmp_path, capsys):
    importlib.import_module("quickstart").main(["--epochs", "1", "--limit", "64", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "audio missing" in printed and "certified" in printed
    assert (tmp_path / "quickstart.png").stat().st_size > 0


def test_results_page_is_generated(tmp_path):
    page = tmp_path / "results.md"
    result = importlib.import_module("results").main([
        "--datasets", "av", "--seeds", "0", "1", "--methods", "jt", "crmt_jt", "--no-ablations", "--processes", "1",
        "--runs", str(tmp_path / "runs"), "--page", str(page), "--figures", str(tmp_path / "figures"),
        "--extra", *TINY,
    ])
    text = page.read_text()
    assert "| JT |" in text and "| CRMT-JT |" in text and "±" in text
    assert "(1) JT's modality preference" in text and "(2) CRMT-JT beats JT" in text
    assert (tmp_path / "figures" / "results_av_certified.png").is_file()
    assert set(result["verdicts"]) >= {"1", "2"}
