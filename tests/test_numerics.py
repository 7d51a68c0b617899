"""Bad input and numerics: NaN/Inf inputs and heads, empty batches and B = 1, K = 2, extreme integration
weights, float64 and autocast (see docs/reliability.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crmt_plugin import CRMTError, crmt_loss, margin_loss

from helpers import (LateFusion, assert_states_equal, exact_distance, linear_model, state_of, tanh_batch, tanh_model,
                     wrap)


# ============================================================================ NaN / Inf
LIP = {"a": 3.0, "b": 3.0}


def poisoned(value, modality="a", sample=3):
    inputs, y = tanh_batch()
    inputs[modality][sample, 0] = value
    return inputs, y


PATHS = {
    "forward_train": lambda crmt, x, y: crmt(x),
    "certify": lambda crmt, x, y: crmt.certify(x, y, lipschitz=LIP),
    "certify_eval": lambda crmt, x, y: crmt.eval().certify(x, y, lipschitz=LIP),
    "estimate_lipschitz": lambda crmt, x, y: crmt.estimate_lipschitz([(x, y)]),
    "estimate_lipschitz_eval": lambda crmt, x, y: crmt.eval().estimate_lipschitz([(x, y)]),
    "fit_integration": lambda crmt, x, y: crmt.fit_integration([(x, y)], lipschitz=LIP, epochs=2),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("path", list(PATHS))
def test_non_finite_inputs_are_refused_on_every_path(path, value):
    """Also when the encoder squashes the Inf into finite logits (tanh): nothing is written."""
    crmt = wrap(tanh_model())
    before = state_of(crmt)
    x, y = poisoned(value)
    with pytest.raises(CRMTError, match="(?i)nan|non-finite"):
        PATHS[path](crmt, x, y)
    assert_states_equal(state_of(crmt), before)


def test_huge_but_finite_inputs_are_not_mistaken_for_inf():
    """The training check sums each input (cheap); a sum that overflows is re-checked exactly."""
    crmt = wrap(tanh_model())
    x, y = tanh_batch()
    x["a"] = torch.full_like(x["a"], 3e38)  # finite, but its sum is inf in float32
    assert torch.isinf(x["a"].sum()) and torch.isfinite(x["a"]).all()
    out = crmt(x)  # tanh squashes it: finite logits, nothing to report
    assert torch.isfinite(out.logits).all()


def test_inference_forward_does_not_check_and_costs_no_sync():
    """Documented: only training forwards (train mode, grad enabled) check; inference passes NaN on."""
    crmt = wrap(tanh_model()).eval()
    x, _ = poisoned(float("nan"))
    with torch.no_grad():
        logits = crmt(x).logits
    assert torch.isnan(logits[3]).all() and torch.isfinite(logits[[0, 1, 2, 4]]).all()


def _poison_head(crmt, what):
    with torch.no_grad():
        if what == "integration":
            crmt.head.integration["a"][1] = float("nan")
        else:
            crmt.head.bias[1] = float("inf")


@pytest.mark.parametrize("what", ["integration", "bias"])
def test_non_finite_head_is_reported_everywhere(what):
    crmt = wrap(tanh_model())
    _poison_head(crmt, what)
    x, y = tanh_batch()
    with pytest.raises(CRMTError, match="diverged"):
        crmt(x)
    before = state_of(crmt)
    with pytest.raises(CRMTError, match="non-finite integration weights"):
        crmt.certify(x, y, lipschitz=LIP)
    with pytest.raises(CRMTError, match="non-finite integration weights"):
        crmt.fit_integration([(x, y)], lipschitz=LIP)
    assert_states_equal(state_of(crmt), before)


# ============================================================================ empty batch, B = 1
def empty_batch(dtype=torch.float32):
    return {"a": torch.zeros(0, 6, dtype=dtype), "b": torch.zeros(0, 5, dtype=dtype)}, torch.zeros(0, dtype=torch.long)


def test_empty_batch_forward_and_certify():
    crmt = wrap(tanh_model())
    x, y = empty_batch()
    out = crmt(x)  # a training forward: the finite check passes on nothing
    assert out.logits.shape == (0, 4) and all(z.shape == (0, 4) for z in out.unimodal.values())
    for labels in (y, None):
        cert = crmt.certify(x, labels, lipschitz=LIP)
        assert cert.radius.shape == cert.correct.shape == (0,)
        assert all(r.shape == (0,) for r in cert.radius_per_modality.values())
    assert torch.equal(cert.certified_accuracy([0.0, 1.0]), torch.zeros(2, dtype=cert.radius.dtype))


def test_empty_batches_are_skipped_by_lipschitz_and_step_two():
    crmt = wrap(tanh_model())
    data, empty = tanh_batch(), empty_batch()
    assert torch.equal(crmt.estimate_lipschitz([empty, data, empty]).values,
                       crmt.estimate_lipschitz([data]).values)
    with pytest.raises(CRMTError, match="empty"):
        crmt.estimate_lipschitz([empty, empty])
    before = state_of(crmt)
    fits = []
    for loader in ([empty, data], [data]):
        crmt.load_state_dict(before)
        crmt.fit_integration(loader, lipschitz=LIP, epochs=3, generator=torch.Generator().manual_seed(0))
        fits.append(crmt.head.integration_weights().detach())
    assert torch.equal(fits[0], fits[1]) and not torch.equal(fits[0], wrap(tanh_model()).head.integration_weights())
    with pytest.raises(CRMTError, match="empty"):
        crmt.fit_integration([empty], lipschitz=LIP)


def test_loss_of_an_empty_batch_sums_to_zero_and_leaves_the_gradients_zero():
    crmt = wrap(tanh_model())
    out = crmt(empty_batch()[0])
    y = torch.zeros(0, dtype=torch.long)
    assert crmt_loss(out, y, reduction="none").shape == (0,)
    total = crmt_loss(out, y, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert all(p.grad is None or not p.grad.any() for p in crmt.parameters())


def test_mean_loss_of_an_empty_batch_is_refused():
    crmt = wrap(tanh_model())
    with pytest.raises(CRMTError, match="empty"):
        crmt_loss(crmt(empty_batch()[0]), torch.zeros(0, dtype=torch.long))
    with pytest.raises(CRMTError, match="empty"):
        margin_loss(crmt(empty_batch()[0]), torch.zeros(0, dtype=torch.long))


def bn_model():
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
           "b": nn.Sequential(nn.Linear(5, 8), nn.Tanh())}
    return LateFusion(enc, {"a": 8, "b": 8}, 4)


def test_batch_of_one_with_batchnorm_keeps_torchs_own_error():
    crmt = wrap(bn_model())
    x, y = tanh_batch(batch=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as info:
        crmt(x)
    assert not isinstance(info.value, CRMTError)  # not re-worded, not hidden
    # the eval-mode steps use the running statistics: B = 1 is fine there, and train mode comes back
    assert crmt.certify(x, y, lipschitz=LIP).radius.shape == (1,)
    assert crmt.estimate_lipschitz([(x, y)]).values.shape == (2, 4)
    crmt.fit_integration([(x, y)], lipschitz=LIP, epochs=1)
    assert crmt.training and crmt.model.encoders["a"][1].training
    assert crmt.eval()(x).logits.shape == (1, 4)


# ============================================================================ K = 2, extreme a, dtypes
def linear_case(num_classes, dtype, seed=3, batch=32):
    model = linear_model({"a": 3, "b": 4}, {"a": 5, "b": 2}, num_classes, seed=seed, dtype=dtype)
    crmt = wrap(model)
    gen = torch.Generator().manual_seed(seed)
    x = {"a": torch.randn(batch, 3, generator=gen).to(dtype), "b": torch.randn(batch, 4, generator=gen).to(dtype)}
    with torch.no_grad():
        y = crmt(x).logits.argmax(1)
    y[:4] = (y[:4] + 1) % num_classes  # a few misclassified samples
    spectral = {n: float(torch.linalg.matrix_norm(model.encoders[n].weight.detach().double(), ord=2))
                for n in model.widths}
    return crmt, model, x, y, spectral


def assert_sound(crmt, model, x, y, spectral, rtol):
    exact = exact_distance(crmt, model, x, y)
    for kind in ("tight", "paper"):
        cert = crmt.certify(x, y, lipschitz=spectral, denominator=kind)
        assert cert.sound and torch.isfinite(cert.radius).all() and (cert.radius >= 0).all()
        assert torch.equal(cert.radius == 0, ~cert.correct)
        assert (cert.radius <= exact * (1 + rtol) + 1e-12).all(), (cert.radius - exact).max()
        assert cert.correct[4:].any()  # something is certified: the bound is not vacuous
    return cert


def test_two_classes_end_to_end_and_sound():
    crmt, model, x, y, spectral = linear_case(2, torch.float64)
    out = crmt(x)
    loss = crmt_loss(out, y, rho=2.0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in crmt.parameters())
    crmt.zero_grad()
    result = crmt.fit_integration([(x, y)], lipschitz=spectral, epochs=5)
    assert result.mean_radius_after >= result.mean_radius_before
    assert_sound(crmt, model, x, y, spectral, rtol=1e-9)


def set_integration(crmt, values):
    """a^(m) = values[m] for every class (alpha = softplus^-1(a), in float64)."""
    with torch.no_grad():
        for name, value in zip(crmt.modalities, values):
            alpha = torch.tensor(value, dtype=torch.float64)
            alpha = alpha + torch.log(-torch.expm1(-alpha))
            crmt.head.integration[name].fill_(float(alpha))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("values", [(1e-8, 1e-8), (1e4, 1e4), (1e-8, 1e4)])
def test_extreme_integration_weights_give_finite_sound_radii(values, dtype, rtol):
    crmt, model, x, y, spectral = linear_case(4, dtype)
    set_integration(crmt, values)
    a = crmt.head.integration_weights().detach().double()
    torch.testing.assert_close(a, torch.tensor(values, dtype=torch.float64)[:, None].expand(2, 4), rtol=1e-3, atol=0)
    assert_sound(crmt, model, x, y, spectral, rtol)


def test_zero_integration_weights_certify_an_infinite_radius_because_the_output_is_constant():
    crmt, model, x, y, spectral = linear_case(4, torch.float64)
    with torch.no_grad():
        for name in crmt.modalities:
            crmt.head.integration[name].fill_(-1e3)  # softplus underflows to exactly 0
    assert not crmt.head.integration_weights().any()
    cert = crmt.certify(x, y, lipschitz=spectral)
    assert torch.equal(cert.radius == math.inf, cert.correct)
    far = {n: t + 1e6 * torch.randn_like(t) for n, t in x.items()}
    assert torch.equal(crmt(far).logits, crmt(x).logits)  # h(x) = b: no perturbation matters


def test_float64_model_stays_float64_everywhere():
    crmt = wrap(tanh_model(dtype=torch.float64))
    x, y = tanh_batch(dtype=torch.float64)
    out = crmt(x)
    assert out.logits.dtype == torch.float64 and all(z.dtype == torch.float64 for z in out.unimodal.values())
    loss = crmt_loss(out, y)
    assert loss.dtype == torch.float64
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in crmt.parameters())
    assert crmt.estimate_lipschitz([(x, y)]).values.dtype == torch.float64
    crmt.fit_integration([(x, y)], lipschitz=LIP, epochs=2)
    assert all(p.dtype == torch.float64 for p in crmt.parameters())
    assert crmt.certify(x, y, lipschitz=LIP).radius.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_on_cpu(dtype):
    crmt = wrap(tanh_model())
    x, y = tanh_batch()
    with torch.autocast("cpu", dtype=dtype):
        out = crmt(x)
        loss = crmt_loss(out, y, rho=2.0)
    assert out.unimodal["a"].dtype == dtype  # autocast really ran the head's matmuls in low precision
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in crmt.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_certify_lipschitz_and_step_two_ignore_an_enclosing_autocast(dtype):
    crmt = wrap(tanh_model(seed=5))
    x, y = tanh_batch(seed=6)
    state = state_of(crmt)

    def everything():
        crmt.load_state_dict(state)
        cert = crmt.certify(x, y, lipschitz=LIP)
        lip = crmt.estimate_lipschitz([(x, y)])
        result = crmt.fit_integration([(x, y)], lipschitz=LIP, epochs=3, generator=torch.Generator().manual_seed(0))
        return cert.radius, lip.values, result, crmt.head.integration_weights().detach()

    expected = everything()
    with torch.autocast("cpu", dtype=dtype):
        got = everything()
        low = crmt.eval()(x).unimodal["a"]
    crmt.train()
    assert low.dtype == dtype  # the same forward outside certify does run in low precision
    for g, e in zip(got, expected):
        assert (torch.equal(g, e) if isinstance(e, torch.Tensor) else g == e)
