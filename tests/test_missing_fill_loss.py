"""CRMTWrapper.missing_fill_loss: the missing-modality neutrality term (a filled modality carries no class evidence)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crmt_plugin import CRMTError, CRMTWrapper, crmt_loss

from conftest import cnn_batch, cnn_model, linear_model


def wrap(model, **kw):
    return CRMTWrapper(model, head="fusion.fc", modalities=model.widths, **kw)


def fill_of(inputs):
    return {n: x.mean(dim=0) for n, x in inputs.items()}


def contributions(crmt, fill):
    """(M, K) u^(m)(fill) = a^(m) * z^(m)(fill), computed independently of the method under test."""
    crmt.eval()
    with torch.no_grad():
        out = crmt({n: x.unsqueeze(0) for n, x in fill.items()})
    a = crmt.head.integration_weights()
    return torch.stack([a[i] * out.unimodal[n][0] for i, n in enumerate(crmt.modalities)])


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 1000), k=st.integers(2, 7))
def test_equals_the_kl_from_uniform_of_each_fill_contribution(seed, k):
    crmt = wrap(linear_model({"a": 4, "b": 3}, {"a": 5, "b": 6}, k, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    fill = {"a": torch.randn(4, generator=gen, dtype=torch.float64),
            "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    got = crmt.missing_fill_loss(fill)
    u = contributions(crmt, fill).double()
    p = torch.softmax(u, dim=1)
    kl = (torch.full_like(p, 1 / k) * (math.log(1 / k) - p.log())).sum(dim=1)    # KL(uniform || softmax(u))
    torch.testing.assert_close(got.double(), kl.mean(), rtol=1e-5, atol=1e-6)
    assert float(got.detach()) >= 0


def test_zero_exactly_when_every_fill_contribution_is_class_constant():
    crmt = wrap(linear_model({"a": 4, "b": 3}, {"a": 5, "b": 6}, 4))
    fill = {"a": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    with torch.no_grad():      # features at the fill = the encoders' biases; make both encoders output 0 there
        for enc in crmt.model.encoders.values():
            enc.bias.zero_()
    assert float(crmt.missing_fill_loss(fill).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        crmt.model.encoders["a"].bias.fill_(1.0)
    assert float(crmt.missing_fill_loss(fill).detach()) > 1e-4


def test_restores_every_training_flag_and_trains_the_encoders(cnn):
    crmt = wrap(cnn)
    crmt.train()
    cnn.encoders["audio"][1].eval()                 # a frozen BatchNorm inside a training model stays frozen
    before = [(m, m.training) for m in crmt.modules()]
    inputs, y = cnn_batch()
    stats = cnn.encoders["audio"][1].running_mean.clone()
    term = crmt.missing_fill_loss(fill_of(inputs))
    assert [(m, m.training) for m in crmt.modules()] == before
    torch.testing.assert_close(cnn.encoders["audio"][1].running_mean, stats)   # eval mode: statistics untouched
    term.backward()
    grads = {n: p.grad for n, p in crmt.named_parameters() if p.grad is not None}
    assert any(n.startswith("model.encoders.audio") for n in grads) and any("image" in n for n in grads)


def test_training_with_it_makes_the_filled_modality_neutral():
    torch.manual_seed(0)
    crmt = wrap(cnn_model(), integration_init=0.1)
    inputs, y = cnn_batch(batch=32)
    fill = fill_of(inputs)
    optimizer = torch.optim.Adam(crmt.parameters(), lr=1e-2)
    start = float(crmt.missing_fill_loss(fill).detach())
    for _ in range(60):
        crmt.train()
        loss = crmt_loss(crmt(inputs), y) + crmt.missing_fill_loss(fill)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = float(crmt.missing_fill_loss(fill).detach())
    spread = contributions(crmt, fill)
    assert end < 0.2 * start + 1e-3, (start, end)
    assert float((spread.max(dim=1).values - spread.min(dim=1).values).max()) < 0.5


def test_refuses_a_fill_that_does_not_name_every_modality(cnn):
    crmt = wrap(cnn)
    inputs, _ = cnn_batch()
    with pytest.raises(CRMTError, match="must map every modality"):
        crmt.missing_fill_loss({"audio": inputs["audio"][0]})


def test_modalities_selects_which_fill_contributions_are_constrained():
    crmt = wrap(linear_model({"a": 4, "b": 3}, {"a": 5, "b": 6}, 4, seed=3))
    gen = torch.Generator().manual_seed(3)
    fill = {"a": torch.randn(4, generator=gen, dtype=torch.float64),
            "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    u = contributions(crmt, fill).double()
    kl = torch.logsumexp(u, dim=1) - u.mean(dim=1) - math.log(u.shape[1])
    torch.testing.assert_close(crmt.missing_fill_loss(fill, "b").detach().double(), kl[1])
    torch.testing.assert_close(crmt.missing_fill_loss(fill, ["a", "b"]).detach().double(), kl.mean())
    with pytest.raises(CRMTError, match="non-empty subset"):
        crmt.missing_fill_loss(fill, ["c"])
    with pytest.raises(CRMTError, match="non-empty subset"):
        crmt.missing_fill_loss(fill, [])

