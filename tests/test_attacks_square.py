"""crmt_plugin.attacks.square: exact budgets and bounds, any modality shape, and it does attack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.attacks import Square
from crmt_plugin.errors import CRMTError

from test_attacks import TwoModalMLP, batch, joint_l2, linf

FAST = settings(max_examples=15, deadline=None, derandomize=True)


@FAST
@given(norm=st.sampled_from(["l2", "linf"]), per_modality=st.booleans(), eps_a=st.floats(0.01, 5.0),
       eps_i=st.floats(0.01, 5.0), seed=st.integers(0, 10_000))
def test_square_budget_and_bounds_exact(norm, per_modality, eps_a, eps_i, seed):
    model = TwoModalMLP(seed=seed % 5)
    x = batch(16, seed)  # image in [0, 1), audio unbounded
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(seed))
    eps = {"audio": eps_a, "image": eps_i} if per_modality else eps_a
    bounds = {"image": (0.0, 1.0)}
    adv = Square(eps, norm=norm, queries=30, bounds=bounds, generator=torch.Generator().manual_seed(seed))(model, x, y)
    tol = 1 + 1e-6
    if per_modality:
        for name, e in eps.items():
            size = joint_l2(adv, x, [name]) if norm == "l2" else linf(adv, x, name)
            assert (size <= e * tol).all(), (name, size.max().item(), e)
    else:
        size = joint_l2(adv, x, ["audio", "image"]) if norm == "l2" else torch.maximum(linf(adv, x, "audio"),
                                                                                       linf(adv, x, "image"))
        assert (size <= eps * tol).all(), (size.max().item(), eps)
    assert adv["image"].min() >= 0 and adv["image"].max() <= 1
    assert adv["audio"].dtype == x["audio"].dtype and not adv["audio"].requires_grad


def test_square_model_never_sees_inputs_outside_bounds_and_no_hidden_clamp():
    seen = []
    net = TwoModalMLP()

    def model(inputs):
        seen.append((inputs["image"].min().item(), inputs["image"].max().item(), inputs["audio"].abs().max().item()))
        return net(inputs)

    x = batch(32)
    y = torch.randint(0, 4, (32,))
    Square(2.0, queries=20, bounds={"image": (0.125, 0.875)}, generator=torch.Generator().manual_seed(0))(
        model, {"audio": x["audio"], "image": x["image"].clamp(0.125, 0.875)}, y)
    assert seen and min(s[0] for s in seen) >= 0.125 and max(s[1] for s in seen) <= 0.875
    assert max(s[2] for s in seen) > x["audio"].abs().max().item()  # audio has no bound: not clamped


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("linf", 0.15)])
def test_square_reduces_accuracy_on_a_simple_model(norm, eps):
    model = TwoModalMLP(hidden=32, seed=3)
    x = batch(128, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean accuracy 1
    adv = Square(eps, norm=norm, queries=300, generator=torch.Generator().manual_seed(0))(model, x, y)
    with torch.no_grad():
        acc = (model(adv).argmax(1) == y).double().mean().item()
    assert acc < 0.8, acc


@pytest.mark.parametrize("shape", [(7,), (5, 9), (2, 6, 6), (2, 3, 4, 4)])
def test_square_any_modality_shape_one_modality(shape):
    torch.manual_seed(0)
    d = int(torch.tensor(shape).prod())
    net = nn.Linear(d + 4, 5)
    x = {"m": torch.randn((64,) + shape), "other": torch.randn(64, 4)}
    model = lambda inputs: net(torch.cat([inputs["m"].flatten(1), inputs["other"]], 1))  # noqa: E731
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = Square(1.5, queries=200, modalities="m", generator=torch.Generator().manual_seed(0))(model, x, y)
    assert adv["other"] is x["other"] and adv["m"].shape == x["m"].shape
    assert ((adv["m"] - x["m"]).flatten(1).norm(dim=1) <= 1.5 * (1 + 1e-6)).all()
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).any()


def test_square_per_sample_budgets_reproducible_and_errors():
    model = TwoModalMLP()
    x = batch(8)
    y = torch.randint(0, 4, (8,))
    eps = torch.linspace(0, 2, 8)
    runs = [Square(eps, queries=10, generator=torch.Generator().manual_seed(s))(model, x, y) for s in (1, 1, 2)]
    assert torch.equal(runs[0]["audio"], runs[1]["audio"]) and not torch.equal(runs[0]["audio"], runs[2]["audio"])
    size = joint_l2(runs[0], x, ["audio", "image"])
    assert (size <= eps.double() * (1 + 1e-6) + 1e-12).all() and size[0] == 0
    with torch.no_grad():
        clean = model(x)
    with pytest.raises(CRMTError, match="class labels"):
        Square(1.0, queries=2)(model, x, clean)
    with pytest.raises(CRMTError, match="queries"):
        Square(1.0, queries=0)
    assert Square(1.0, queries=7).cost == {"forward": 8, "forward_backward": 0}
