"""Certified losses: a worst-case CE below log 2 means certified at eps, above means not; the denominators are
those ``certify`` uses; gradients flow; misuse is refused."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin import CRMTWrapper
from crmt_plugin.benchmark.evaluate import certifiable_copy
from crmt_plugin.certified_loss import certified_loss, lipschitz_margin_loss, worst_case_cross_entropy
from crmt_plugin.errors import CRMTError
from crmt_plugin.lipschitz import LipschitzConstants
from crmt_plugin.lipschitz_layers import AOLLinear, MaxMin

LOG2 = math.log(2.0)


class Net(nn.Module):
    def __init__(self, widths, in_dims, classes):
        super().__init__()
        self.encoders = nn.ModuleDict({n: nn.Sequential(AOLLinear(in_dims[n], widths[n]), MaxMin(),
                                                        AOLLinear(widths[n], widths[n])) for n in widths})
        self.fusion = nn.Linear(sum(widths.values()), classes)

    def forward(self, **x):
        return self.fusion(torch.cat([self.encoders[n](x[n]) for n in self.encoders], 1))


def setup(seed, classes, scale=3.0):
    torch.manual_seed(seed)
    widths, in_dims = {"a": 6, "b": 8}, {"a": 5, "b": 3}
    net = Net(widths, in_dims, classes).double()
    with torch.no_grad():
        net.fusion.weight.mul_(scale)
    x = {n: torch.randn(64, d, dtype=torch.float64) for n, d in in_dims.items()}
    return net, widths, x


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.floats(0.3, 2.0))
def test_crmt_loss_at_eps_zero_is_cross_entropy_and_above_the_radius_exceeds_log2(seed, classes, lip_a):
    net, widths, x = setup(seed, classes)
    crmt = CRMTWrapper(net, head="fusion", modalities=widths).double().eval()
    with torch.no_grad():
        crmt.head.log_scale.fill_(1.5)
        y = crmt(x).logits.argmax(1)
    lip = {"a": lip_a, "b": 1.0}
    cert = crmt.certify(x, y, lipschitz=lip)
    out = crmt(x)
    above = cert.radius * 1.001
    per = torch.stack([certified_loss(out, y, crmt=crmt, lipschitz=lip, eps=float(e), rho=0.0, reduction="none")[i]
                       for i, e in enumerate(above)])
    assert bool((per > LOG2 - 1e-9).all())                 # just outside the radius: the worst logits flip
    loss = certified_loss(out, y, crmt=crmt, lipschitz=lip, eps=0.0, rho=0.0, reduction="none")
    assert torch.allclose(loss.double(), nn.functional.cross_entropy(out.logits, y, reduction="none"), atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.floats(0.01, 1.0))
def test_crmt_loss_below_log2_means_certified(seed, classes, eps):
    net, widths, x = setup(seed, classes, scale=10.0)
    crmt = CRMTWrapper(net, head="fusion", modalities=widths).double().eval()
    with torch.no_grad():
        crmt.head.log_scale.fill_(3.0)
        y = crmt(x).logits.argmax(1)
    lip = LipschitzConstants(torch.tensor([0.7, 1.3], dtype=torch.float64), ("a", "b"), sound=True, source="declared")
    per = certified_loss(crmt(x), y, crmt=crmt, lipschitz=lip, eps=eps, rho=0.0, reduction="none")
    cert = crmt.certify(x, y, lipschitz=lip)
    below = per < LOG2
    assert bool((cert.radius[below] > eps).all())
    assert bool((per[cert.radius < eps] > LOG2).all())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.floats(0.01, 1.0))
def test_plain_head_loss_matches_certify_of_the_plain_model(seed, classes, eps):
    net, widths, x = setup(seed, classes, scale=10.0)
    with torch.no_grad():
        y = net(**x).argmax(1)
    lip = {"a": 0.8, "b": 1.2}
    per = lipschitz_margin_loss(net(**x), y, head=net.fusion, widths=widths, lipschitz=lip, eps=eps, reduction="none")
    cert = certifiable_copy(net, modalities=widths).certify(x, y, lipschitz=lip)
    assert bool((cert.radius[per < LOG2] > eps).all())
    assert bool((per[cert.radius < eps] > LOG2).all())


def test_per_modality_term_and_gradients():
    net, widths, x = setup(0, 4)
    crmt = CRMTWrapper(net, head="fusion", modalities=widths).double()
    y = torch.randint(0, 4, (64,))
    joint = certified_loss(crmt(x), y, crmt=crmt, lipschitz={"a": 1.0, "b": 1.0}, eps=0.5, rho=0.0)
    both = certified_loss(crmt(x), y, crmt=crmt, lipschitz={"a": 1.0, "b": 1.0}, eps=0.5, rho=1.0)
    assert float(both) > float(joint)
    both.backward()
    grads = [p.grad for p in crmt.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(crmt.head.integration["a"].grad.abs().sum()) > 0
    assert float(net.encoders["a"][0].weight.grad.abs().sum()) > 0


def test_the_per_modality_budget_defaults_to_each_modalitys_share_eps_over_sqrt_m():
    net, widths, x = setup(1, 4)
    crmt = CRMTWrapper(net, head="fusion", modalities=widths).double()
    y = torch.randint(0, 4, (64,))
    lip = {"a": 0.7, "b": 1.3}
    out = crmt(x)
    default = certified_loss(out, y, crmt=crmt, lipschitz=lip, eps=0.6, rho=1.0, reduction="none")
    share = certified_loss(out, y, crmt=crmt, lipschitz=lip, eps=0.6, rho=1.0, eps_modality=0.6 / 2 ** 0.5,
                           reduction="none")
    whole = certified_loss(out, y, crmt=crmt, lipschitz=lip, eps=0.6, rho=1.0, eps_modality=0.6, reduction="none")
    torch.testing.assert_close(default, share)
    assert bool((whole >= default - 1e-12).all()) and float((whole - default).max()) > 0  # a larger budget costs more


def test_worst_case_ce_is_ce_of_the_shifted_logits():
    logits = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    den = torch.rand(5, 4, dtype=torch.float64)
    margins = logits.gather(1, y[:, None]) - logits
    shifted = logits + 0.3 * den * (1 - nn.functional.one_hot(y, 4))
    assert torch.allclose(worst_case_cross_entropy(margins, den, y, 0.3),
                          nn.functional.cross_entropy(shifted, y, reduction="none").float(), atol=1e-6)


def test_misuse_is_refused():
    net, widths, x = setup(0, 3)
    crmt = CRMTWrapper(net, head="fusion", modalities=widths).double()
    y = torch.zeros(64, dtype=torch.long)
    per_class = LipschitzConstants(torch.ones(2, 3, dtype=torch.float64), ("a", "b"), sound=False, source="empirical")
    with pytest.raises(CRMTError, match="per-modality"):
        certified_loss(crmt(x), y, crmt=crmt, lipschitz=per_class, eps=1.0)
    with pytest.raises(CRMTError, match="eps"):
        certified_loss(crmt(x), y, crmt=crmt, lipschitz={"a": 1.0, "b": 1.0}, eps=-1.0)
    with pytest.raises(CRMTError, match="CRMTWrapper"):
        certified_loss(crmt(x), y, crmt=net, lipschitz={"a": 1.0, "b": 1.0}, eps=1.0)
