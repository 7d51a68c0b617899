"""CRMTWrapper and CRMTHead: conversion, orthonormality, export, checkpoints, validation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import crmt_plugin
from crmt_plugin import CRMTError, CRMTWrapper, crmt_loss
from crmt_plugin.head import CRMTHead

from conftest import LateFusion, cnn_batch, cnn_model, linear_model


def wrap(model, **kw):
    return CRMTWrapper(model, head="fusion.fc", modalities=model.widths, **kw)


def test_output_structure_and_user_model_still_returns_logits(cnn):
    crmt = wrap(cnn)
    inputs, _ = cnn_batch()
    out = crmt(inputs)
    assert out.logits.shape == (8, 5)
    assert {n: z.shape for n, z in out.unimodal.items()} == {"audio": (8, 5), "image": (8, 5)}
    assert {n: f.shape for n, f in out.features.items()} == {"audio": (8, 16), "image": (8, 12)}
    crmt.eval()
    torch.testing.assert_close(cnn(**inputs), crmt(inputs).logits)
    a = crmt.head.integration_weights()
    torch.testing.assert_close(out.logits, a[0] * out.unimodal["audio"] + a[1] * out.unimodal["image"]
                               + crmt.head.bias)


@given(k=st.integers(2, 6), d1=st.integers(1, 8), d2=st.integers(1, 8), seed=st.integers(0, 100))
def test_conversion_from_linear_head(k, d1, d2, seed):
    """Orthonormal rows when K <= d (nearest orthonormal matrix), unit rows otherwise; a >= 0."""
    torch.manual_seed(seed)
    linear = nn.Linear(d1 + d2, k).double()
    head = CRMTHead.from_linear(linear, {"a": d1, "b": d2})
    for name, d in (("a", d1), ("b", d2)):
        w = head.unimodal_weight(name)
        gram = w @ w.T
        if k <= d:
            torch.testing.assert_close(gram, torch.eye(k, dtype=w.dtype), atol=1e-10, rtol=0)
        else:
            torch.testing.assert_close(gram.diagonal(), torch.ones(k, dtype=w.dtype))
        assert head.orthonormal_rows[name] == (k <= d)
    assert (head.integration_weights() >= 0).all()
    torch.testing.assert_close(head.bias, linear.bias)


def test_conversion_is_exact_when_rows_are_already_orthogonal():
    linear = nn.Linear(10, 3).double()
    with torch.no_grad():
        scales = torch.tensor([[2.], [0.5], [1.]], dtype=torch.float64)
        linear.weight.copy_(torch.cat([torch.eye(3, 6, dtype=torch.float64) * scales,
                                       torch.eye(3, 4, dtype=torch.float64) * 3.0], dim=1))
    head = CRMTHead.from_linear(linear, {"a": 6, "b": 4})
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(head(x), linear(x))


def test_rows_stay_orthonormal_through_training():
    torch.manual_seed(0)
    model = cnn_model(num_classes=5)
    crmt = wrap(model)
    opt = torch.optim.SGD(crmt.parameters(), lr=0.5, momentum=0.9)
    crmt.check_optimizer(opt)
    for step in range(30):
        inputs, y = cnn_batch(seed=step)
        loss = crmt_loss(crmt(inputs), y, rho=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in crmt.modalities:
        w = crmt.head.unimodal_weight(name)
        torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    assert (crmt.head.integration_weights() >= 0).all()


def test_export_matches_and_is_plain(cnn):
    crmt = wrap(cnn)
    with torch.no_grad():  # move away from the initial values
        for p in crmt.head.parameters():
            p.add_(torch.randn_like(p))
    crmt.eval()
    inputs, _ = cnn_batch()
    plain = crmt.export()
    assert isinstance(plain.fusion.fc, nn.Linear) and not isinstance(plain.fusion.fc, CRMTHead)
    assert not any(isinstance(m, CRMTHead) for m in plain.modules())
    expected = crmt(inputs).logits
    got = plain(**inputs)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert plain is not cnn and isinstance(cnn.fusion.fc, CRMTHead)  # the wrapper keeps working


def test_state_dict_round_trip_and_clean_keys():
    crmt = wrap(cnn_model(seed=0))
    with torch.no_grad():
        for p in crmt.parameters():
            p.add_(0.1)
    buffer = io.BytesIO()
    torch.save(crmt.state_dict(), buffer)
    buffer.seek(0)
    other = wrap(cnn_model(seed=1))
    other.load_state_dict(torch.load(buffer))
    crmt.eval(), other.eval()
    inputs, _ = cnn_batch()
    assert torch.equal(crmt(inputs).logits, other(inputs).logits)
    keys = list(crmt.state_dict())
    assert "model.fusion.fc.integration.audio" in keys and "model.fusion.fc.directions.image" in keys
    assert not any("parametrizations" in k or "_module" in k for k in keys)


def test_train_mode_is_restored_by_every_step(cnn):
    crmt = wrap(cnn)
    inputs, y = cnn_batch()
    lip = crmt_plugin.LipschitzConstants.declared({"audio": 3.0, "image": 3.0})
    for training in (True, False):
        crmt.train(training)
        crmt.estimate_lipschitz([(inputs, y)])
        crmt.certify(inputs, y, lipschitz=lip)
        crmt.fit_integration([(inputs, y)], lipschitz=lip, epochs=1)
        assert all(m.training == training for m in crmt.modules())


def test_attribute_passthrough_and_optimizer_check(cnn):
    crmt = wrap(cnn)
    assert crmt.encoders is cnn.encoders
    stale = torch.optim.SGD(cnn_model().parameters(), lr=0.1)
    with pytest.raises(CRMTError, match="build it after wrapping"):
        crmt.check_optimizer(stale)


def test_bias_free_head(cnn):
    model = LateFusion(cnn.encoders, cnn.widths, 5, bias=False)
    crmt = wrap(model)
    assert "model.fusion.fc.bias" in crmt.state_dict() and not any(
        n.endswith("fc.bias") for n, _ in crmt.named_parameters())
    crmt.eval()
    inputs, _ = cnn_batch()
    torch.testing.assert_close(crmt.export()(**inputs), crmt(inputs).logits)


def test_custom_call_signature():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = linear_model({"a": 3, "b": 2}, {"a": 4, "b": 4}, 3, dtype=torch.float32)

        def forward(self, xa, xb):
            return self.inner(a=xa, b=xb)

    model = Positional()
    crmt = CRMTWrapper(model, head="inner.fusion.fc", modalities={"a": 4, "b": 4},
                       call=lambda m, x: m(x["a"], x["b"]))
    out = crmt({"a": torch.randn(2, 3), "b": torch.randn(2, 2)})
    assert out.logits.shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "fusion.missing"}, "not found"),
        ({"head": "encoders.audio.0"}, "expected torch.nn.Linear"),
        ({"modalities": {"audio": 16, "image": 11}}, "sum to 27"),
        ({"modalities": {"audio": 28}}, "at least 2 modalities"),
        ({"modalities": {"audio": 16, "im.age": 12}}, "without '.'"),
    ],
)
def test_bad_wrapping_raises(kwargs, message):
    model = cnn_model()
    args = {"head": "fusion.fc", "modalities": model.widths, **kwargs}
    with pytest.raises(CRMTError, match=message):
        CRMTWrapper(model, **args)


def test_wrapping_twice_raises(cnn):
    wrap(cnn)
    with pytest.raises(CRMTError, match="already"):
        wrap(cnn)
    with pytest.raises(CRMTError, match="already"):
        CRMTWrapper(cnn, example_inputs=cnn_batch()[0])


def test_single_class_head_raises():
    model = LateFusion({"a": nn.Identity(), "b": nn.Identity()}, {"a": 2, "b": 2}, 1)
    with pytest.raises(CRMTError, match="at least 2 classes"):
        wrap(model)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x: {"audio": x["audio"]}, r"missing \['image'\]"),
        (lambda x: {**x, "text": x["audio"]}, r"unknown \['text'\]"),
        (lambda x: [x["audio"], x["image"]], "mapping"),
        (lambda x: {"audio": x["audio"], "image": 3}, "must be a tensor"),
    ],
)
def test_bad_inputs_raise(cnn, mutate, message):
    crmt = wrap(cnn)
    inputs, _ = cnn_batch()
    with pytest.raises(CRMTError, match=message):
        crmt(mutate(inputs))


def test_nan_inputs_are_reported_in_training(cnn):
    crmt = wrap(cnn)
    inputs, _ = cnn_batch()
    inputs["image"][3] = float("nan")
    with pytest.raises(CRMTError, match=r"image"):
        crmt(inputs)


def test_deepcopy_and_device_follow_inputs(cnn):
    crmt = wrap(cnn)
    clone = copy.deepcopy(crmt)
    inputs, _ = cnn_batch()
    clone.eval(), crmt.eval()
    assert torch.equal(clone(inputs).logits, crmt(inputs).logits)
    assert crmt(inputs).logits.device == inputs["audio"].device


def test_unit_row_conversion_reproduces_a_trained_joint_head_exactly():
    """orthonormal=False: certify a JT model as it is (same logits), soundly."""
    model = linear_model({"a": 3, "b": 4}, {"a": 6, "b": 5}, 4, seed=3)
    inputs = {"a": torch.randn(32, 3, dtype=torch.float64), "b": torch.randn(32, 4, dtype=torch.float64)}
    with torch.no_grad():
        before = model(**inputs)
    joint_weight = model.fusion.fc.weight.detach().clone()
    crmt = CRMTWrapper(model, head="fusion.fc", modalities={"a": 6, "b": 5}, orthonormal=False)
    assert crmt.head.orthonormal_rows == {"a": False, "b": False}
    with torch.no_grad():
        torch.testing.assert_close(crmt(inputs).logits, before, rtol=1e-12, atol=1e-12)
    # sound: never above the exact minimal l2 distance of this linear model
    jac = {n: joint_weight[:, sl] @ model.encoders[n].weight.detach()
           for n, sl in (("a", slice(0, 6)), ("b", slice(6, 11)))}
    y = before.argmax(1)
    margins = before.gather(1, y[:, None]) - before
    diff = torch.sqrt(sum((g[y][:, None, :] - g[None]).pow(2).sum(-1) for g in jac.values()))
    exact = torch.where(torch.nn.functional.one_hot(y, 4).bool(), torch.inf, margins / diff).amin(1)
    bounds = {n: float(torch.linalg.matrix_norm(model.encoders[n].weight.detach(), ord=2)) for n in ("a", "b")}
    cert = crmt.certify(inputs, y, lipschitz=bounds)
    assert cert.sound and bool((cert.radius <= exact * (1 + 1e-9)).all()) and bool((cert.radius > 0).all())


# ============================================================================ exact mode restore (issue 12 item 5)
def frozen_bn_crmt(**kw):
    model = cnn_model()
    crmt = wrap(model, **kw)
    crmt.train()
    frozen = model.encoders["audio"][1]  # a BatchNorm frozen for fine-tuning, inside a training model
    frozen.eval()
    return crmt, frozen


@pytest.mark.parametrize("step", ["certify", "estimate_lipschitz", "fit_integration", "verify_structure", "wrap"])
def test_a_frozen_batchnorm_stays_frozen(step):
    inputs, y = cnn_batch(batch=16)
    lip = crmt_plugin.LipschitzConstants.declared({"audio": 3.0, "image": 3.0})
    if step == "wrap":  # the wrap-time probe runs the model too
        model = cnn_model()
        model.train()
        model.encoders["audio"][1].eval()
        before = {name: m.training for name, m in model.named_modules()}
        stats = model.encoders["audio"][1].running_mean.clone()
        crmt = CRMTWrapper(model, head="fusion.fc", modalities=model.widths, example_inputs=inputs)
        after = {name: m.training for name, m in model.named_modules() if name in before}
        assert after == before and not model.encoders["audio"][1].training
        assert torch.equal(model.encoders["audio"][1].running_mean, stats)
        assert crmt.structure_verified
        return
    crmt, frozen = frozen_bn_crmt()
    before = {name: m.training for name, m in crmt.named_modules()}
    {
        "certify": lambda: crmt.certify(inputs, y, lipschitz=lip),
        "estimate_lipschitz": lambda: crmt.estimate_lipschitz([(inputs, y)]),
        "fit_integration": lambda: crmt.fit_integration([(inputs, y)], lipschitz=lip, epochs=1),
        "verify_structure": lambda: crmt.verify_structure(inputs),
    }[step]()
    after = {name: m.training for name, m in crmt.named_modules()}
    assert after == before
    assert not frozen.training and crmt.training and crmt.model.encoders["image"][1].training


# ============================================================================ public discovery attributes
def test_modalities_and_widths_are_public_and_in_head_order(cnn):
    crmt = wrap(cnn)
    assert crmt.modalities == ("audio", "image")
    assert list(crmt.widths.items()) == [("audio", 16), ("image", 12)]
    inputs, _ = cnn_batch()
    discovered = CRMTWrapper(cnn_model(), example_inputs=inputs)
    assert discovered.head_path == "fusion.fc" and discovered.widths == crmt.widths
    batch_pair = cnn_batch()
    assert CRMTWrapper(cnn_model(), example_inputs=batch_pair).modalities == ("audio", "image")  # (inputs, y)


def test_example_inputs_must_match_the_declared_modalities():
    inputs, _ = cnn_batch()
    with pytest.raises(CRMTError, match=r"example_inputs carries the modalities \['audio', 'image'\]"):
        CRMTWrapper(cnn_model(), head="fusion.fc", modalities={"audio": 16, "video": 12}, example_inputs=inputs)
    with pytest.raises(CRMTError, match="batch dict"):
        CRMTWrapper(cnn_model(), example_inputs=[1, 2, 3])
