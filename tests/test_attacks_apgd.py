"""crmt_plugin.attacks.pgd with the APGD schedule, the DLR loss and targeted runs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.attacks import PGD, cross_entropy_loss, strong_attack
from crmt_plugin.errors import CRMTError

from test_attacks import TwoModalMLP, batch, closed_form_radius, joint_l2, linear_model, linf

FAST = settings(max_examples=15, deadline=None, derandomize=True)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@FAST
@given(norm=st.sampled_from(["l2", "linf"]), per_modality=st.booleans(), eps=st.floats(0.01, 5.0),
       loss=st.sampled_from(["ce", "dlr", "cw"]), targets=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_apgd_budget_respected_exactly(norm, per_modality, eps, loss, targets, seed):
    model = TwoModalMLP(seed=seed % 5)
    x = batch(12, seed)
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(seed))
    budget = {"audio": eps, "image": eps / 2} if per_modality else eps
    attack = PGD(budget, norm=norm, steps=6, schedule="apgd", loss=loss, targets=targets,
                 generator=torch.Generator().manual_seed(seed))
    adv = attack(model, x, y)
    tol = 1 + 1e-6
    if per_modality:
        for name, e in budget.items():
            size = joint_l2(adv, x, [name]) if norm == "l2" else linf(adv, x, name)
            assert (size <= e * tol).all(), (name, size.max().item(), e)
    else:
        size = joint_l2(adv, x, ["audio", "image"]) if norm == "l2" else torch.maximum(linf(adv, x, "audio"),
                                                                                       linf(adv, x, "image"))
        assert (size <= eps * tol).all() and size.max() >= 0.5 * eps


def test_apgd_at_least_as_strong_as_plain_pgd():
    """Same loss, same number of gradient steps: the APGD schedule finds at least as many errors."""
    model = TwoModalMLP(hidden=32, seed=3)
    x = batch(256, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    for norm, eps in (("l2", 0.6), ("linf", 0.12)):
        plain = PGD(eps, norm=norm, steps=20, generator=torch.Generator().manual_seed(0))(model, x, y)
        apgd = PGD(eps, norm=norm, steps=20, schedule="apgd", generator=torch.Generator().manual_seed(0))(model, x, y)
        acc_plain, acc_apgd = accuracy(model, plain, y), accuracy(model, apgd, y)
        assert 0.05 < acc_plain < 0.95, acc_plain  # an informative budget
        assert acc_apgd <= acc_plain, (norm, acc_apgd, acc_plain)
        with torch.no_grad():
            assert cross_entropy_loss(model(apgd), y).mean() >= cross_entropy_loss(model(plain), y).mean()


class Saturated(nn.Module):
    """Logits scaled by 1e4: cross-entropy saturates (its gradient is exactly 0 in float32 for well
    classified samples), the scale-invariant DLR loss does not."""

    def __init__(self):
        super().__init__()
        self.net = TwoModalMLP(hidden=32, seed=3)

    def forward(self, x):
        return 1e4 * self.net(x)


def test_dlr_beats_cross_entropy_on_saturated_logits():
    model = Saturated()
    x = batch(256, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    ce = PGD(0.6, steps=20, schedule="apgd", loss="ce", generator=torch.Generator().manual_seed(0))(model, x, y)
    dlr = PGD(0.6, steps=20, schedule="apgd", loss="dlr", generator=torch.Generator().manual_seed(0))(model, x, y)
    acc_ce, acc_dlr = accuracy(model, ce, y), accuracy(model, dlr, y)
    assert acc_dlr < acc_ce - 0.1, (acc_dlr, acc_ce)


@pytest.mark.parametrize("classes, attacked", [(3, ("a", "b")), (6, ("a",)), (6, ("a", "b"))])
def test_targeted_runs_reach_the_exact_minimal_distance(classes, attacked):
    """Linear multi-class model: the minimal l2 distance to class k's boundary is margin_k / ||w_y - w_k||;
    targeted runs against every other class flip >= 99% of samples at 1.001x the minimum, none at 0.999x."""
    sizes = {"a": 5, "b": 8}
    model, composite = linear_model(sizes, classes, seed=classes)
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(300, d, generator=g, dtype=torch.float64) for n, d in sizes.items()}
    logits = model(x)
    y = logits.argmax(1)
    radius, _ = closed_form_radius(composite, logits, y, attacked)
    for loss in ("cw", "dlr") if classes >= 4 else ("cw",):
        attack = PGD(radius * 1.001, modalities=attacked, steps=20, schedule="apgd", loss=loss,
                     targets=classes - 1, generator=torch.Generator().manual_seed(1))
        fooled = (model(attack(model, x, y)).argmax(1) != y).double().mean().item()
        assert fooled >= 0.99, (loss, fooled)
    below = attack.replace(eps=radius * 0.999)
    assert (model(below(model, x, y)).argmax(1) == y).all(), "flipped below the minimal distance"
    strong = strong_attack(radius * 1.001, modalities=attacked, targets=classes - 1, steps=20,
                           generator=torch.Generator().manual_seed(2))
    fooled = (model(strong(model, x, y)).argmax(1) != y).double().mean().item()
    assert fooled >= 0.99, fooled


def test_targeted_needs_labels_and_costs():
    model = TwoModalMLP()
    x = batch(4)
    with torch.no_grad():
        clean = model(x)
    with pytest.raises(CRMTError, match="class labels"):
        PGD(0.5, targets=2)(model, x, clean)
    with pytest.raises(CRMTError, match="schedule"):
        PGD(0.5, schedule="cosine")
    assert PGD(1.0, steps=50, schedule="apgd", restarts=2).cost == {"forward_backward": 102, "forward": 0}
    assert PGD(1.0, steps=10).cost == {"forward_backward": 10, "forward": 1}
    assert PGD(1.0, steps=5, targets=3).label == "PGD-T-l2"


def test_few_classes_fall_back_to_cw():
    """DLR needs 3 classes (4 targeted); with 2 the runs use the CW margin and still work."""
    torch.manual_seed(0)
    net = nn.Linear(6, 2).double()
    x = {"a": torch.randn(64, 6, dtype=torch.float64)}
    model = lambda inputs: net(inputs["a"])  # noqa: E731
    y = model(x).argmax(1)
    adv = strong_attack(3.0, generator=torch.Generator().manual_seed(0))(model, x, y)
    assert (model(adv).argmax(1) != y).double().mean() > 0.5
    assert math.isfinite(float(adv["a"].sum()))
