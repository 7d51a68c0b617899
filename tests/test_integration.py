"""Step 2 (fit_integration): the accuracy constraint, validation-based selection, the objectives,
early-stop warnings, and the guarantees (only a changes, a >= 0)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import crmt_plugin
from crmt_plugin import CRMTError, CRMTWrapper, LipschitzConstants
from crmt_plugin.integration import OBJECTIVES
from crmt_plugin.models import LateFusionNet

from helpers import trained_cnn

K = 4
LIP = {"p": 1.0, "q": 1.0}


def toy(n_a=30, n_b=4):
    """Identity encoders, so z^(m) = x^(m): a majority group A where modality p is right by 4 and q
    wrong by 1, a minority group B where p is wrong by 1 and q right by 3. At a = 1 every sample is
    right (A: 4 - 1, B: 3 - 1); the mean radius grows by shrinking a^(q), which gives up group B."""
    model = LateFusionNet({"p": nn.Identity(), "q": nn.Identity()}, {"p": K, "q": K}, K).double()
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.cat([torch.eye(K), torch.eye(K)], 1))
        model.fusion.fc.bias.zero_()
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"p": K, "q": K})
    return crmt, toy_data(n_a, n_b)


def toy_data(n_a, n_b, b_margin=3.0):
    y = torch.arange(n_a + n_b) % K
    right = nn.functional.one_hot(y, K).double()
    wrong = nn.functional.one_hot((y + 1) % K, K).double()
    p = torch.cat([4 * right[:n_a], wrong[n_a:]])
    q = torch.cat([wrong[:n_a], b_margin * right[n_a:]])
    return [({"p": p, "q": q}, y)]


def fit(crmt, data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = crmt.fit_integration(data, lipschitz=LIP, **{"epochs": 20, "lr": 0.1, **kw})
    return result, [w for w in caught if "fit_integration" in str(w.message)]


def accuracy(crmt, data):
    with torch.no_grad():
        return torch.cat([(crmt(x).logits.argmax(1) == y) for x, y in data]).double().mean().item()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_unconstrained_objective_lowers_accuracy_and_the_constraint_prevents_it(objective):
    crmt, data = toy()
    free, warned = fit(crmt, data, objective=objective, accuracy_tolerance=math.inf)
    assert free.accuracy_before == 1.0
    assert free.accuracy_after < 0.9 and accuracy(crmt, data) < 0.9  # group B given up, silently
    assert not warned and not free.rejected_epochs

    crmt, data = toy()
    kept, warned = fit(crmt, data, objective=objective)  # default tolerance
    assert kept.accuracy_tolerance == 0.005
    assert kept.accuracy_after >= kept.accuracy_before - 0.005
    assert accuracy(crmt, data) == pytest.approx(kept.accuracy_after)
    assert kept.mean_radius_after > kept.mean_radius_before  # still a real improvement
    assert kept.best_epoch > 0 and kept.rejected_epochs
    assert len(warned) == 1 and "refused" in str(warned[0].message)


def test_early_stop_is_reported_and_patience_none_runs_every_epoch():
    crmt, data = toy()
    result, warned = fit(crmt, data, objective="mean_radius", patience=2)
    assert result.stopped_early
    assert len(result.history) == result.rejected_epochs[-1] < 20
    assert result.rejected_epochs[-2:] == [len(result.history) - 1, len(result.history)]
    assert len(warned) == 1 and "stopped early" in str(warned[0].message)

    crmt, data = toy()
    result, warned = fit(crmt, data, objective="mean_radius", patience=None)
    assert not result.stopped_early and len(result.history) == 20
    assert len(warned) == 1 and "stopped early" not in str(warned[0].message)


def test_zero_tolerance_and_no_improvement_keeps_the_initial_a_bitwise():
    crmt, data = toy(n_a=0, n_b=8)  # only group B: every step that favours p loses accuracy at once
    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    result, _ = fit(crmt, data, objective="mean_radius", accuracy_tolerance=0.0, lr=2.0, epochs=3)
    if result.best_epoch == 0:
        assert all(torch.equal(before[k], v) for k, v in crmt.state_dict().items())
    assert result.accuracy_after >= result.accuracy_before


def test_the_a_kept_is_the_best_on_the_validation_loader():
    crmt, train = toy(n_a=30, n_b=4)
    val = toy_data(n_a=4, n_b=8, b_margin=2.0)  # validation's group B is harder: it flips sooner there
    result, warned = fit(crmt, train, val_loader=val, objective="mean_radius", patience=None)
    assert result.selected_on == "val" and result.val_before is not None
    feasible = [(v, e + 1) for e, (v, acc) in enumerate(zip(result.objective_history, result.accuracy_history))
                if acc >= result.val_before.accuracy - 0.005]
    best_value, best_epoch = max(feasible, key=lambda t: (t[0], -t[1])) if feasible else (None, 0)
    if best_value is None or best_value <= result.val_before.objective:
        best_epoch = 0
    assert result.best_epoch == best_epoch
    # the numbers reported for the validation split are those of the a now in the head
    cert = crmt.certify(*val[0], lipschitz=LIP)
    assert cert.radius.mean().item() == pytest.approx(result.val_after.mean_radius, rel=1e-9)
    assert accuracy(crmt, val) == pytest.approx(result.val_after.accuracy)
    assert accuracy(crmt, val) >= result.val_before.accuracy - 0.005
    # selecting on the training data instead keeps a later epoch, which the validation data refuses
    crmt2, _ = toy(n_a=30, n_b=4)
    on_train, _ = fit(crmt2, train, objective="mean_radius", patience=None)
    assert on_train.best_epoch > result.best_epoch
    assert accuracy(crmt2, val) < result.val_before.accuracy - 0.005


def test_reported_metrics_match_direct_computation():
    crmt, data = toy()
    fill = {"p": torch.zeros(K, dtype=torch.float64), "q": torch.zeros(K, dtype=torch.float64)}
    result, _ = fit(crmt, data, objective="balanced", missing_fill=fill, epochs=3)
    inputs, y = data[0]
    cert = crmt.certify(inputs, y, lipschitz=LIP)
    after = result.train_after
    assert after.mean_radius == pytest.approx(cert.radius.mean().item(), rel=1e-9)
    for n in ("p", "q"):
        assert after.radius_per_modality[n] == pytest.approx(cert.radius_per_modality[n].mean().item(), rel=1e-9)
        missing = {**inputs, n: fill[n].expand_as(inputs[n])}
        assert after.missing_accuracy[n] == pytest.approx(accuracy(crmt, [(missing, y)]))
        assert after.missing_radius[n] == pytest.approx(crmt.certify(missing, y, lipschitz=LIP).radius.mean().item(),
                                                        rel=1e-9)
    # balanced = mean log of the 2M + 1 mean radii (plus a floor of 1e-3 x the largest initial one)
    for metrics in (result.train_before, after):
        parts = [metrics.mean_radius, *metrics.radius_per_modality.values(), *metrics.missing_radius.values()]
        b = result.train_before
        delta = 1e-3 * max(b.mean_radius, *b.radius_per_modality.values(), *b.missing_radius.values())
        assert metrics.objective == pytest.approx(sum(math.log(v + delta) for v in parts) / len(parts), rel=1e-9)


def test_missing_modality_accuracy_is_protected_too():
    """Clean accuracy stays at 1 either way (tolerance 0.2); shrinking a^(q) hands the prediction
    with p missing to p's fill (biased to class 0). protect_missing (the default) refuses that."""
    fill = {"p": torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64), "q": torch.zeros(K, dtype=torch.float64)}
    runs = {}
    for protect in (False, True):
        crmt, data = toy(n_a=20, n_b=10)
        runs[protect], _ = fit(crmt, data, objective="mean_radius", accuracy_tolerance=0.2, missing_fill=fill,
                               protect_missing=protect)
    before = runs[True].train_before.missing_accuracy["p"]
    assert runs[False].train_after.missing_accuracy["p"] < before - 0.2
    assert runs[True].train_after.missing_accuracy["p"] >= before - 0.2
    assert runs[True].mean_radius_after > runs[True].mean_radius_before


def test_default_missing_fill_is_the_mean_logit():
    crmt, data = toy()
    result, _ = fit(crmt, data, epochs=0)
    inputs, y = data[0]
    mean_inputs = {n: v.mean(0) for n, v in inputs.items()}  # identity encoders: mean logit = logit of the mean
    for n in ("p", "q"):
        missing = {**inputs, n: mean_inputs[n].expand_as(inputs[n])}
        assert result.train_before.missing_accuracy[n] == pytest.approx(accuracy(crmt, [(missing, y)]))


@pytest.mark.parametrize("objective", [*OBJECTIVES, "callable"])
def test_each_objective_improves_itself_and_changes_only_a(objective):
    crmt, data = toy()
    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    if objective == "callable":
        def objective(r):  # the per-modality radius of q alone
            return r["modality"][1]
    result, _ = fit(crmt, data, objective=objective, epochs=5)
    assert result.train_after.objective > result.train_before.objective
    changed = [k for k in before if not torch.equal(before[k], crmt.state_dict()[k])]
    assert changed and all(".integration." in k for k in changed), changed
    assert (crmt.head.integration_weights() >= 0).all()


def test_balanced_keeps_what_the_mean_radius_gives_up():
    """Unconstrained, the mean joint radius is maximised by shrinking a^(q), which gives up group B
    (a third of the data here); the balanced objective, which also scores the per-modality and
    missing-modality radii in relative terms, keeps it."""
    crmt, data = toy(n_a=20, n_b=10)
    paper, _ = fit(crmt, data, objective="mean_radius", accuracy_tolerance=math.inf, epochs=10)
    crmt, data = toy(n_a=20, n_b=10)
    balanced, _ = fit(crmt, data, objective="balanced", accuracy_tolerance=math.inf, epochs=10)
    assert paper.accuracy_after < 0.7 < balanced.accuracy_after
    assert balanced.mean_radius_after > balanced.mean_radius_before
    assert balanced.train_after.radius_per_modality["p"] >= paper.train_after.radius_per_modality["p"]


@pytest.mark.parametrize("kw, message", [
    (dict(objective="radius"), "objective must be one of"),
    (dict(accuracy_tolerance=-0.1), "accuracy_tolerance"),
    (dict(accuracy_tolerance=1.5), "fraction"),
    (dict(patience=0), "patience"),
    (dict(missing_fill={"p": torch.zeros(K)}), "missing_fill"),
    (dict(val_loader=[]), "empty val_loader"),
])
def test_bad_arguments_raise(kw, message):
    crmt, data = toy()
    with pytest.raises(CRMTError, match=message):
        crmt.fit_integration(data, lipschitz=LIP, **kw)


def test_non_finite_validation_data_is_refused():
    crmt, data = toy()
    (inputs, y), = toy_data(4, 4)
    inputs["p"][0, 0] = float("nan")
    with pytest.raises(CRMTError, match="validation samples have non-finite"):
        crmt.fit_integration(data, lipschitz=LIP, val_loader=[(inputs, y)])


# -- moved from test_certify.py: the guarantees on a small CNN ----------------------------------------




@pytest.mark.parametrize("declared", [False, True])
def test_fit_integration_raises_radius_and_changes_nothing_else(declared):
    crmt, data = trained_cnn()
    crmt.train()
    lip = LipschitzConstants.declared({"audio": 5.0, "image": 5.0}) if declared else crmt.estimate_lipschitz(data)
    before_state = {k: v.clone() for k, v in crmt.state_dict().items()}
    radius_before = torch.cat([crmt.certify(x, y, lipschitz=lip).radius for x, y in data]).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = crmt.fit_integration(data, lipschitz=lip, objective="mean_radius", epochs=30, lr=5e-2,
                                      accuracy_tolerance=math.inf, batch_size=32,
                                      generator=torch.Generator().manual_seed(0))
    radius_after = torch.cat([crmt.certify(x, y, lipschitz=lip).radius for x, y in data]).mean()
    assert result.mean_radius_after > result.mean_radius_before
    assert radius_after > radius_before
    torch.testing.assert_close(radius_after, torch.tensor(result.mean_radius_after, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    assert crmt.training
    after_state = crmt.state_dict()
    changed = [k for k in before_state if not torch.equal(before_state[k], after_state[k])]
    assert changed and all(".integration." in k for k in changed), changed
    assert (crmt.head.integration_weights() >= 0).all()


def test_fit_integration_with_zero_epochs_is_a_no_op():
    crmt, data = trained_cnn(steps=3)
    before = {k: v.clone() for k, v in crmt.state_dict().items()}
    result = crmt.fit_integration(data, lipschitz={"audio": 1.0, "image": 1.0}, epochs=0)
    assert result.best_epoch == 0 and result.mean_radius_after == result.mean_radius_before
    assert all(torch.equal(before[k], v) for k, v in crmt.state_dict().items())


def test_the_package_exports_the_result_types():
    assert crmt_plugin.IntegrationResult is crmt_plugin.integration.IntegrationResult
    assert crmt_plugin.integration.SplitMetrics.__dataclass_fields__.keys() >= {
        "accuracy", "mean_radius", "radius_per_modality", "missing_accuracy", "missing_radius", "objective"}
