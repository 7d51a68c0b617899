"""crmt_plugin.attacks.losses: the DLR / CW / targeted losses against hand formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crmt_plugin.attacks import (
    cross_entropy_loss,
    cw_margin_loss,
    dlr_loss,
    targeted_ce_loss,
    targeted_cw_loss,
    targeted_dlr_loss,
)
from crmt_plugin.attacks.losses import resolve_loss
from crmt_plugin.errors import CRMTError

FAST = settings(max_examples=30, deadline=None, derandomize=True)


def hand_dlr(z, y):
    """-(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3), one sample at a time in plain Python."""
    out = []
    for row, label in zip(z.tolist(), y.tolist()):
        ordered = sorted(row, reverse=True)
        best_other = max(v for k, v in enumerate(row) if k != label)
        out.append(-(row[label] - best_other) / (ordered[0] - ordered[2] + 1e-12))
    return torch.tensor(out, dtype=torch.float64)


def hand_targeted_dlr(z, y, t):
    out = []
    for row, label, target in zip(z.tolist(), y.tolist(), t.tolist()):
        ordered = sorted(row, reverse=True)
        out.append(-(row[label] - row[target]) / (ordered[0] - 0.5 * (ordered[2] + ordered[3]) + 1e-12))
    return torch.tensor(out, dtype=torch.float64)


@FAST
@given(classes=st.integers(4, 12), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), shift=st.floats(-50, 50))
def test_dlr_matches_hand_formula_and_is_scale_invariant(classes, seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(16, classes, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, classes, (16,), generator=g)
    t = (y + torch.randint(1, classes, (16,), generator=g)) % classes  # a class other than y
    torch.testing.assert_close(dlr_loss(z, y), hand_dlr(z, y), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(targeted_dlr_loss(z, y, t), hand_targeted_dlr(z, y, t), rtol=1e-9, atol=1e-9)
    # invariant under z -> a z + b, a > 0: the CRMT head's logit scale cannot hide the gradient
    torch.testing.assert_close(dlr_loss(scale * z + shift, y), dlr_loss(z, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(targeted_dlr_loss(scale * z + shift, y, t), targeted_dlr_loss(z, y, t),
                               rtol=1e-6, atol=1e-6)
    # positive exactly when misclassified
    wrong = z.argmax(1) != y
    assert torch.equal(dlr_loss(z, y) > 0, wrong)
    assert torch.equal(cw_margin_loss(z, y) > 0, wrong)


def test_cw_and_targeted_by_hand():
    z = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(cw_margin_loss(z, y), torch.tensor([-1.0, 3.0]))
    assert torch.allclose(targeted_cw_loss(z, y, torch.tensor([1, 2])), torch.tensor([-1.5, 1.0]))
    ce = torch.nn.functional.cross_entropy(z, torch.tensor([1, 2]), reduction="none")
    assert torch.allclose(targeted_ce_loss(z, y, torch.tensor([1, 2])), -ce)
    assert torch.allclose(cross_entropy_loss(z, y), torch.nn.functional.cross_entropy(z, y, reduction="none"))


def test_dlr_needs_enough_classes_and_names_resolve():
    with pytest.raises(CRMTError, match="3 classes"):
        dlr_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(CRMTError, match="4 classes"):
        targeted_dlr_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    assert resolve_loss("dlr", targeted=False)[1] is dlr_loss
    assert resolve_loss("margin", targeted=True)[1] is targeted_cw_loss
    assert resolve_loss(None, targeted=False)[1] is cross_entropy_loss
    with pytest.raises(CRMTError, match="unknown attack loss"):
        resolve_loss("hinge", targeted=False)
