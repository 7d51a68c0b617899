"""crmt_loss / margin_loss: the formula, its numerics and its mixup variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import crmt_plugin
from crmt_plugin import CRMTError, CRMTOutput, crmt_loss, margin_loss


def make_output(batch, num_modalities, num_classes, scale=3.0, seed=0, dtype=torch.float32, width=6):
    gen = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(num_modalities)]
    unimodal = {n: (torch.randn(batch, num_classes, generator=gen) * scale).to(dtype) for n in names}
    features = {n: torch.randn(batch, width, generator=gen).to(dtype) for n in names}
    a = torch.rand(num_modalities, num_classes, generator=gen) + 0.1
    logits = sum(a[i] * unimodal[n] for i, n in enumerate(names)).to(dtype)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return CRMTOutput(logits, unimodal, features), y


def naive_margin(out, y, scales=None):
    """The paper's formula literally: log of a sum of exps, one sample at a time."""
    values = []
    for i in range(len(y)):
        total = 0.0
        for j, (name, z) in enumerate(out.unimodal.items()):
            s = 1.0 if scales is None else scales[j][i]
            for k in range(z.shape[1]):
                if k != int(y[i]):
                    total += math.exp(float(s * (z[i, k] - z[i, y[i]])))
        values.append(math.log(total))
    return torch.tensor(values)


@given(batch=st.integers(1, 6), num_modalities=st.integers(2, 4), num_classes=st.integers(2, 7),
       seed=st.integers(0, 1000), rho=st.floats(0, 5))
def test_raw_margin_matches_naive_formula(batch, num_modalities, num_classes, seed, rho):
    out, y = make_output(batch, num_modalities, num_classes, seed=seed)
    expected = naive_margin(out, y)
    got = margin_loss(out, y, margin="raw", reduction="none")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    total = crmt_loss(out, y, rho=rho, margin="raw")
    ce = F.cross_entropy(out.logits, y)
    torch.testing.assert_close(total, ce + rho * expected.float().mean(), rtol=1e-5, atol=1e-5)


@given(batch=st.integers(1, 5), num_classes=st.integers(2, 6), seed=st.integers(0, 1000),
       temperature=st.floats(0.5, 20))
def test_relative_margin_matches_naive_formula(batch, num_classes, seed, temperature):
    out, y = make_output(batch, 3, num_classes, seed=seed)
    scales = [temperature / out.features[n].norm(dim=1) for n in out.unimodal]
    expected = naive_margin(out, y, scales)
    got = margin_loss(out, y, temperature=temperature, penalty="logsumexp", reduction="none")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@given(batch=st.integers(1, 5), num_modalities=st.integers(2, 3), num_classes=st.integers(2, 6),
       seed=st.integers(0, 1000), target=st.floats(-3, 3), temperature=st.floats(0.5, 20))
def test_hinged_margin_matches_naive_formula(batch, num_modalities, num_classes, seed, target, temperature):
    """penalty="hinge": max(0, LSE - log(M (K - 1)) + target) on the relative margins."""
    out, y = make_output(batch, num_modalities, num_classes, seed=seed)
    scales = [temperature / out.features[n].norm(dim=1) for n in out.unimodal]
    lse = naive_margin(out, y, scales)
    expected = (lse - math.log(num_modalities * (num_classes - 1)) + target).clamp_min(0)
    got = margin_loss(out, y, temperature=temperature, penalty="hinge", margin_target=target, reduction="none")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@given(batch=st.integers(1, 5), num_modalities=st.integers(2, 3), num_classes=st.integers(2, 6),
       seed=st.integers(0, 1000), temperature=st.floats(0.5, 20))
def test_sigmoid_penalty_is_each_modalitys_probability_of_error(batch, num_modalities, num_classes, seed,
                                                                temperature):
    """penalty="sigmoid": sum_m (1 - softmax(T z^(m) / ||phi^(m)||)_y)."""
    out, y = make_output(batch, num_modalities, num_classes, seed=seed)
    expected = 0
    for n, z in out.unimodal.items():
        p = torch.softmax(z * (temperature / out.features[n].norm(dim=1, keepdim=True)), dim=1)
        expected = expected + 1 - p.gather(1, y[:, None]).squeeze(1)
    got = margin_loss(out, y, temperature=temperature, penalty="sigmoid", reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_defaults_are_the_documented_ones_and_raw_stays_the_paper():
    out, y = make_output(8, 2, 5, seed=4)
    default = crmt_plugin.loss.DEFAULT_PENALTY
    torch.testing.assert_close(margin_loss(out, y), margin_loss(out, y, margin="relative", penalty=default))
    torch.testing.assert_close(margin_loss(out, y, margin="raw"),
                               naive_margin(out, y).float().mean(), rtol=1e-5, atol=1e-5)
    total, terms = crmt_loss(out, y, return_terms=True)
    assert terms["margin"] == margin_loss(out, y)
    assert total == pytest.approx(float(terms["base"] + crmt_plugin.loss.DEFAULT_RHO * terms["margin"]), rel=1e-6)


def test_sigmoid_penalty_pushes_neither_reached_nor_hopeless_margins():
    """Its gradient vanishes where a modality is right by far and where it is wrong by far; the
    paper's logsumexp pushes every sample with the same strength, reached or hopeless."""
    z = torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-30.0, 0.0, 0.0]], requires_grad=True)
    features = torch.eye(3) * 10.0  # ||phi|| = 10 = T: relative margins equal the raw ones
    out = CRMTOutput(z.detach(), {"a": z, "b": z.detach()}, {"a": features, "b": features})
    y = torch.zeros(3, dtype=torch.long)
    grads = {}
    for penalty in ("sigmoid", "logsumexp"):
        z.grad = None
        margin_loss(out, y, penalty=penalty, reduction="sum").backward()
        grads[penalty] = z.grad.abs().sum(1)
    assert grads["sigmoid"][1] > 0.1
    assert grads["sigmoid"][0] < 1e-9 and grads["sigmoid"][2] < 1e-9
    torch.testing.assert_close(grads["logsumexp"], torch.ones(3))


def test_hinge_stops_pushing_satisfied_samples():
    """A sample whose every relative margin is large contributes 0 and no gradient; one that is not
    still gets the full smooth-max gradient."""
    out, y = make_output(4, 2, 5, seed=5)
    for n, z in out.unimodal.items():
        z.requires_grad_(True)
        with torch.no_grad():  # sample 0, 1: the label's logit far above the others (relative margin ~ T)
            z[:2] = -out.features[n][:2].norm(dim=1, keepdim=True)
            z[:2].scatter_(1, y[:2, None], out.features[n][:2].norm(dim=1, keepdim=True))
    per = margin_loss(out, y, penalty="hinge", margin_target=1.0, reduction="none")
    assert torch.equal(per[:2], torch.zeros(2)) and (per[2:] > 0).all()
    per.sum().backward()
    for z in out.unimodal.values():
        assert torch.equal(z.grad[:2], torch.zeros_like(z.grad[:2]))
        assert z.grad[2:].abs().sum() > 0


def test_relative_margin_is_scale_free():
    """Scaling features and uni-modal logits together (the degenerate direction) changes nothing."""
    out, y = make_output(6, 2, 5, seed=3)
    for z in out.unimodal.values():  # every modality classifies correctly: raw margins > 0
        z.scatter_add_(1, y[:, None], torch.full((6, 1), 20.0))
    scaled = CRMTOutput(out.logits, {n: 1e3 * z for n, z in out.unimodal.items()},
                        {n: 1e3 * f for n, f in out.features.items()})
    torch.testing.assert_close(margin_loss(out, y), margin_loss(scaled, y), rtol=1e-5, atol=1e-5)
    assert margin_loss(scaled, y, margin="raw") < margin_loss(out, y, margin="raw") - 100


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_finite_for_huge_logits_float32(scale):
    out, y = make_output(16, 2, 10, scale=scale, seed=1)
    for z in out.unimodal.values():
        z.requires_grad_(True)
    for margin in ("raw", "relative"):
        loss = crmt_loss(out, y, rho=2.0, margin=margin)
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, list(out.unimodal.values()))
        assert all(torch.isfinite(g).all() for g in grads)
    # the naive exp(z) * exp(-z_y) of the reference overflows here
    z = out.unimodal["m0"]
    naive = (torch.exp(z) * torch.exp(-z.gather(1, y[:, None]))).sum(1).log()
    assert not torch.isfinite(naive).all() or scale < 89


def test_finite_under_bf16_autocast():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 10)
    with torch.no_grad():
        lin.weight.mul_(3e3)
    x = torch.randn(16, 8)
    y = torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zb = lin(x), lin(-x)
        assert za.dtype == torch.bfloat16
        out = CRMTOutput(za + zb, {"a": za, "b": zb}, {"a": x, "b": x})
        for margin in ("raw", "relative"):
            loss = crmt_loss(out, y, rho=2.0, margin=margin)
            assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


def naive_mixup_margin(out, y_a, y_b, lam):
    values = []
    for i in range(len(y_a)):
        total = 0.0
        for z in out.unimodal.values():
            target = lam * z[i, y_a[i]] + (1 - lam) * z[i, y_b[i]]
            for k in range(z.shape[1]):
                if k not in (int(y_a[i]), int(y_b[i])):
                    total += math.exp(float(z[i, k] - target))
        values.append(math.log(total) if total > 0 else 0.0)
    return torch.tensor(values)


@given(seed=st.integers(0, 1000), lam=st.floats(0, 1), num_classes=st.integers(2, 6))
def test_mixup_matches_naive_formula(seed, lam, num_classes):
    out, y_a = make_output(5, 2, num_classes, seed=seed)
    y_b = torch.roll(y_a, 1)
    expected = naive_mixup_margin(out, y_a, y_b, lam)
    got = margin_loss(out, y_a, y_b=y_b, lam=lam, margin="raw", reduction="none")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    total = crmt_loss(out, y_a, rho=1.5, y_b=y_b, lam=lam, margin="raw")
    ce = lam * F.cross_entropy(out.logits, y_a) + (1 - lam) * F.cross_entropy(out.logits, y_b)
    torch.testing.assert_close(total, ce + 1.5 * expected.float().mean(), rtol=1e-5, atol=1e-5)


def test_mixup_with_two_classes_and_distinct_labels_has_zero_margin_and_finite_grad():
    out, _ = make_output(4, 2, 2, seed=0)
    z = out.unimodal["m0"].requires_grad_(True)
    y_a, y_b = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 1])
    for penalty in ("logsumexp", "hinge", "sigmoid"):
        per = margin_loss(out, y_a, y_b=y_b, lam=0.3, penalty=penalty, reduction="none")
        assert torch.equal(per[:3], torch.zeros(3))
    per.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_terms_reduction_and_custom_base_loss():
    out, y = make_output(6, 2, 4, seed=2)
    total, terms = crmt_loss(out, y, rho=2.0, return_terms=True)
    torch.testing.assert_close(total.detach(), terms["base"] + 2.0 * terms["margin"])
    per = crmt_loss(out, y, rho=2.0, reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), total)
    def hinge(logits, labels):
        return torch.nn.functional.multi_margin_loss(logits, labels, reduction="none")
    custom = crmt_loss(out, y, rho=0.0, base_loss=hinge)
    torch.testing.assert_close(custom, hinge(out.logits, y).mean())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": -1.0}, "rho"),
        ({"y": torch.tensor([0, 1, 9, 0, 1, 2])}, "outside"),
        ({"y": torch.tensor([0, 1, -1, 0, 1, 2])}, "outside"),
        ({"y": torch.zeros(5, dtype=torch.long)}, "shape"),
        ({"y": torch.zeros(6)}, "integer"),
        ({"y_b": torch.zeros(6, dtype=torch.long)}, "lam"),
        ({"reduction": "max"}, "reduction"),
        ({"margin": "cosine"}, "margin"),
        ({"penalty": "square"}, "penalty"),
        ({"penalty": "hinge", "margin_target": "high"}, "margin_target"),
        ({"penalty": "hinge", "margin_target": float("nan")}, "margin_target"),
        ({"penalty": "hinge", "margin_target": True}, "margin_target"),
    ],
)
def test_bad_arguments_raise_library_error(kwargs, message):
    out, y = make_output(6, 2, 4, seed=2)
    kwargs = dict(kwargs)
    y = kwargs.pop("y", y)
    with pytest.raises(CRMTError, match=message):
        crmt_loss(out, y, **kwargs)


def test_not_a_crmt_output():
    with pytest.raises(CRMTError, match="CRMTWrapper"):
        margin_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_public_names_are_few():
    assert set(crmt_plugin.__all__) >= {"CRMTWrapper", "crmt_loss", "CRMTError", "LipschitzConstants"}
    assert len(crmt_plugin.__all__) <= 12
