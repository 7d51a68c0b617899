"""Smoke test of experiments/sound_certification.py on a tiny budget (a few seconds).

Checks the things that must hold whatever the budget: the sound constants are upper bounds of what
is observed (gradient norms of the uni-modal logits, encoder Jacobian spectral norms), the sound
certificates are flagged sound and the empirical ones are not, and PGD inside 0.99 x the sound
radius flips nothing.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("matplotlib", reason="the example draws its figure with the optional matplotlib "
                                  "(pip install matplotlib; scripts/install.sh installs it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "sound_certification.py")


def load_script():
    spec = importlib.util.spec_from_file_location("sound_certification_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sound_certification_script_tiny_budget(tmp_path):
    script = load_script()
    out = script.main([
        "--epochs", "1", "--limit", "64", "--penalties", "0", "0.1", "--integration-epochs", "2",
        "--pgd-steps", "3", "--bisection-steps", "1", "--bisection-pgd-steps", "2", "--jacobian-samples", "8",
        "--conv-method", "fourier", "--out", str(tmp_path), "--quiet",
    ])
    results = out["results"]
    assert [(r["method"], r["penalty"]) for r in results] == [("jt", 0.0), ("crmt", 0.0), ("jt", 0.1), ("crmt", 0.1)]
    for r in results:
        assert r["_certs"]["sound"].sound and not r["_certs"]["empirical"].sound
        for name in ("audio", "image"):
            # a sound bound is never below an observed gradient / Jacobian norm
            assert r["bound_over_tau"][name] >= 1.0
            assert r["bound_over_jacobian"][name] >= 1.0
        for key, check in r["pgd_checks"].items():
            if key.startswith("sound"):
                assert check["flipped"] == 0, (r["method"], r["penalty"], key, check)
    crmt = results[1]
    assert set(crmt["step2"]) == {"empirical", "sound"}
    assert crmt["step2"]["sound"]["mean_radius_after"] >= crmt["step2"]["sound"]["mean_radius_before"]
    jt = results[0]
    assert 0.0 <= jt["conversion"]["prediction_agreement"] <= 1.0
    assert jt["conversion"]["export_max_abs_diff"] < 1e-3
    for name in ("results.md", "results.json", "certification_av.png", "certification_tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    text = (tmp_path / "results.md").read_text()
    assert "Certified accuracy" in text and "Trade-off" in text
