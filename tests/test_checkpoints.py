"""Checkpoints: resuming mid-training is bitwise identical, the state_dict holds the model's own keys
plus the head's parameters, export deploys into the unwrapped model (see docs/reliability.md)."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import assert_states_equal, cnn_batch, cnn_model, state_of, train_steps, wrap


def fresh(seed):
    crmt = wrap(cnn_model(seed=seed))  # BatchNorm (running stats) and Dropout (RNG) on purpose
    return crmt, torch.optim.Adam(crmt.parameters(), lr=1e-2, weight_decay=1e-4)


@pytest.mark.parametrize("load_optimizer", [True, False])
def test_resume_mid_training_is_bitwise_identical(load_optimizer):
    torch.manual_seed(123)
    crmt, optimizer = fresh(seed=0)
    train_steps(crmt, optimizer, 6)
    uninterrupted = state_of(crmt)

    torch.manual_seed(123)
    crmt, optimizer = fresh(seed=0)
    train_steps(crmt, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": crmt.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    del crmt, optimizer
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # a CRMT checkpoint is plain tensors
    resumed, optimizer = fresh(seed=7)  # different initial weights: everything comes from the file
    resumed.load_state_dict(checkpoint["model"])
    if load_optimizer:
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    train_steps(resumed, optimizer, 3, start=3)
    if load_optimizer:
        assert_states_equal(state_of(resumed), uninterrupted)
    else:  # Adam's moments matter: the comparison above can tell a broken resume
        assert any(not torch.equal(v, uninterrupted[k]) for k, v in state_of(resumed).items())


def test_state_dict_keys_are_the_models_own_with_the_head_parameters():
    model = cnn_model()
    plain_keys = set(model.state_dict())
    crmt = wrap(model)
    keys = list(crmt.state_dict())
    assert keys == ["model." + k for k in crmt.model.state_dict()]
    head_keys = {k for k in keys if k.startswith("model.fusion.fc.")}
    assert head_keys == {"model.fusion.fc." + k for k in
                         ("directions.audio", "directions.image", "integration.audio", "integration.image", "bias",
                          "log_scale")}  # log_scale: the shared scale, on by default
    assert {k[len("model."):] for k in keys} - {k[len("model."):] for k in head_keys} == plain_keys - {
        "fusion.fc.weight", "fusion.fc.bias"}


def test_export_deploys_into_the_unwrapped_model_without_crmt_plugin():
    crmt = wrap(cnn_model(seed=0))
    torch.manual_seed(0)
    train_steps(crmt, torch.optim.SGD(crmt.parameters(), lr=0.05), 3)
    crmt.eval()
    plain = crmt.export()
    assert all(not type(m).__module__.startswith("crmt_plugin") for m in plain.modules())
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    deployed = cnn_model(seed=9)  # the user's own class, never wrapped
    deployed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    deployed.eval()
    inputs, _ = cnn_batch(batch=8, seed=42)
    expected = crmt(inputs).logits
    got = deployed(**inputs)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))
