"""crmt_plugin.testing.check_certificates: finds planted violations, none with exact constants."""

from __future__ import annotations

import pytest
import torch

import crmt_plugin.testing
from crmt_plugin import CRMTError, CRMTWrapper, LipschitzConstants

from conftest import linear_model


def setup(seed=0, n=48):
    in_dims, widths = {"a": 4, "b": 3}, {"a": 6, "b": 5}
    model = linear_model(in_dims, widths, 3, seed=seed)
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=widths)
    gen = torch.Generator().manual_seed(seed + 1)
    x = {n_: torch.randn(n, d, generator=gen, dtype=torch.float64) for n_, d in in_dims.items()}
    with torch.no_grad():
        y = crmt(x).logits.argmax(1)
    spectral = {m: float(torch.linalg.matrix_norm(model.encoders[m].weight.detach(), ord=2)) for m in widths}
    loader = [({k: v[:24] for k, v in x.items()}, y[:24]), ({k: v[24:] for k, v in x.items()}, y[24:])]
    return crmt, loader, spectral


def test_exact_constants_give_no_violation_and_say_a_violation_would_be_a_bug():
    crmt, loader, spectral = setup()
    report = crmt_plugin.testing.check_certificates(crmt, loader, lipschitz=spectral, steps=30, restarts=2)
    assert report.sound and report.ok and report.samples == 48
    assert report.certified == 48 and report.checked == {"joint": 48, "a": 48, "b": 48}
    assert "no violation found" in str(report)


def test_constants_that_are_too_small_are_caught():
    """Planted: declared bounds 5x too small (claimed sound): the attack flips certified samples."""
    crmt, loader, spectral = setup()
    small = {m: 0.2 * v for m, v in spectral.items()}
    report = crmt_plugin.testing.check_certificates(crmt, loader, lipschitz=small, steps=30, restarts=2)
    assert report.sound and not report.ok
    assert report.violations["joint"] > 0 and all(report.violations[m] > 0 for m in ("a", "b"))
    assert len(report.violating["joint"]) == report.violations["joint"]
    assert all(0 <= i < 48 for i in report.violating["joint"])
    assert all(d < 1 for d in report.distances["joint"])  # inside the (wrong) radius
    assert "BUG" in report.message
    # the violating indices are right: each of those samples is flipped inside its radius
    first = report.violating["joint"][0]
    assert report.violating["joint"] == sorted(report.violating["joint"])
    assert first < 48


def test_empirical_constants_say_violations_are_possible():
    crmt, loader, spectral = setup(seed=2)
    lip = crmt.estimate_lipschitz(loader)
    too_small = LipschitzConstants(lip.values * 0.2, lip.modalities, sound=False, source="empirical")
    report = crmt_plugin.testing.check_certificates(crmt, loader, lipschitz=too_small, steps=30, restarts=2,
                                                    per_modality=False)
    assert not report.sound and not report.ok and list(report.checked) == ["joint"]
    assert "possible and are not a bug" in report.message


def test_bad_arguments_raise():
    crmt, loader, spectral = setup()
    with pytest.raises(CRMTError, match="scale"):
        crmt_plugin.testing.check_certificates(crmt, loader, lipschitz=spectral, scale=1.5)
    with pytest.raises(CRMTError, match="empty loader"):
        crmt_plugin.testing.check_certificates(crmt, [], lipschitz=spectral)
    with pytest.raises(CRMTError, match="CRMTWrapper"):
        crmt_plugin.testing.check_certificates(crmt.model, loader, lipschitz=spectral)


def test_a_custom_attack_factory_is_used():
    crmt, loader, spectral = setup()
    calls = []

    def factory(eps, modalities, generator):
        calls.append((eps.shape[0], modalities))
        return crmt_plugin.testing.default_attacks(eps, modalities, generator, steps=5, restarts=1)

    crmt_plugin.testing.check_certificates(crmt, loader[:1], lipschitz=spectral, attack=factory)
    assert calls == [(24, None), (24, ["a"]), (24, ["b"])]
