"""Lipschitz-bounded layers: every bound the registry returns is >= the true constant (dense float64 Jacobians,
sampled pairs), and tight where the layer is linear."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev

from crmt_plugin.bounds import encoder_bounds, lipschitz_upper_bound
from crmt_plugin.errors import CRMTError
from crmt_plugin.lipschitz_layers import (AOLConv1d, AOLConv2d, AOLLinear, ConvexResidual, L2NormPool, MaxMin,
                                          ModalityScale)
from crmt_plugin.lipschitz_layers.rescaling import aol_conv_scale, aol_dense_scale

SETTINGS = settings(max_examples=15, deadline=None)


def jacobian_norm(module: nn.Module, x: torch.Tensor) -> float:
    """||J_f(x)||_2 in float64 (dense)."""
    jac = jacrev(lambda v: module(v.unsqueeze(0)).squeeze(0))(x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random (not orthogonal) weights, float64."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.double()


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 10_000))
def test_aol_linear_bound_is_exact_norm_and_at_most_one(n_in, n_out, seed):
    layer = randomise(AOLLinear(n_in, n_out), seed)
    exact = float(torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2))
    bound = lipschitz_upper_bound(layer, (n_in,))
    assert exact <= bound <= exact * (1 + 1e-5) + 1e-12
    assert bound <= 1 + 1e-5
    x = torch.randn(n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert jacobian_norm(layer, x) <= bound


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
       st.integers(0, 2), st.sampled_from([1, 2]), st.integers(4, 9), st.integers(0, 10_000))
def test_aol_conv1d_bound_covers_the_dense_operator(c_in, c_out, k, stride, pad, dil, length, seed):
    layer = randomise(AOLConv1d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil), seed)
    if length + 2 * pad < dil * (k - 1) + 1:
        return
    x = torch.randn(c_in, length, dtype=torch.float64)
    true = jacobian_norm(layer, x)                      # the conv is linear: the Jacobian is the operator
    bound = lipschitz_upper_bound(layer, (c_in, length))
    assert true <= bound <= 1 + 1e-5
    assert bound <= true * (1 + 1e-5) + 1e-9            # the exact operator norm is used (dense here)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 1),
       st.integers(3, 6), st.integers(0, 10_000))
def test_aol_conv2d_bound_covers_the_dense_operator(c_in, c_out, k, stride, pad, size, seed):
    layer = randomise(AOLConv2d(c_in, c_out, k, stride=stride, padding=pad), seed)
    x = torch.randn(c_in, size, size + 1, dtype=torch.float64)
    true = jacobian_norm(layer, x)
    bound = lipschitz_upper_bound(layer, (c_in, size, size + 1))
    assert true <= bound <= 1 + 1e-5
    fourier = lipschitz_upper_bound(layer, (c_in, size, size + 1), conv_method="fourier")
    assert true <= fourier <= 1 + 1e-5                  # the AOL certificate caps the Fourier bound too


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_aol_rescaling_is_one_lipschitz_by_construction(a, b, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(a, b, generator=gen, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(w * aol_dense_scale(w), ord=2)) <= 1 + 1e-12
    k = torch.randn(a, b, 3, 3, generator=gen, dtype=torch.float64)
    conv = nn.Conv2d(b, a, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(k * aol_conv_scale(k).view(1, -1, 1, 1))
    x = torch.randn(b, 5, 5, dtype=torch.float64, generator=gen)
    assert jacobian_norm(conv, x) <= 1 + 1e-12


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_maxmin_and_l2_pool_are_one_lipschitz_on_pairs(half, positions, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2 * half, positions, dtype=torch.float64, generator=gen)
    y = x + torch.randn(x.shape, dtype=torch.float64, generator=gen) * 10 ** torch.empty(16, 1, 1).uniform_(
        -3, 1, generator=gen).double()
    for layer in (MaxMin(), L2NormPool()):
        assert lipschitz_upper_bound(layer, tuple(x.shape[1:])) == 1.0
        out = (layer(x) - layer(y)).flatten(1).norm(dim=1)
        assert bool((out <= (x - y).flatten(1).norm(dim=1) * (1 + 1e-12)).all())
    # MaxMin's constant is attained (a permutation), L2NormPool's for x' = 2x
    x1 = torch.randn(1, 2 * half, positions, dtype=torch.float64, generator=gen)
    assert math.isclose(float((L2NormPool(0.0)(2 * x1) - L2NormPool(0.0)(x1)).norm()), float(x1.norm()), rel_tol=1e-9)


def test_maxmin_refuses_an_odd_size():
    with pytest.raises(CRMTError, match="even"):
        MaxMin()(torch.randn(2, 3))


@SETTINGS
@given(st.floats(0.05, 0.95), st.integers(0, 10_000))
def test_convex_residual_bound(init, seed):
    branch = nn.Sequential(AOLLinear(6, 6), MaxMin(), AOLLinear(6, 6))
    block = ConvexResidual(randomise(branch, seed), init=init).double()
    per_layer = {}
    bound = lipschitz_upper_bound(block, (6,), per_layer=per_layer)
    branch_bound = lipschitz_upper_bound(block.branch, (6,))
    skip, gain = (float(c.detach()) for c in block.coefficients())
    assert abs(gain - init) < 1e-6
    assert skip + gain * branch_bound <= bound <= (skip + gain * branch_bound) * (1 + 1e-12)
    assert bound <= 1 + 1e-5
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(6, dtype=torch.float64, generator=gen)
        assert jacobian_norm(block, x) <= bound


def test_convex_residual_refuses_a_shape_change():
    with pytest.raises(CRMTError, match="keep"):
        lipschitz_upper_bound(ConvexResidual(AOLLinear(4, 3)), (4,))


def test_modality_scale_constant_is_exact():
    x = torch.randn(200, 3, 5) * torch.tensor([1.0, 3.0, 1e-4]).view(1, 3, 1)
    one = ModalityScale.from_data(x)
    assert math.isclose(lipschitz_upper_bound(one, (3, 5)), 1 / float(x.double().std(unbiased=False)), rel_tol=1e-5)
    per = ModalityScale.from_data(x, per_channel=True)          # floor: 0.1 x the overall std
    assert lipschitz_upper_bound(per, (3, 5)) <= 10 / float(x.double().std(unbiased=False)) * (1 + 1e-5)
    with pytest.raises(CRMTError):
        ModalityScale(torch.tensor(0.0), torch.tensor(0.0))


def encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(ModalityScale(torch.tensor(0.1), torch.tensor(0.5)), AOLConv2d(1, 4, 3, padding=1), MaxMin(),
                         ConvexResidual(nn.Sequential(AOLConv2d(4, 4, 3, padding=1), MaxMin())),
                         AOLConv2d(4, 8, 3, stride=2, padding=1), MaxMin(), L2NormPool(), AOLLinear(8, 6))


@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_bound_covers_sampled_jacobians_and_pairs(seed):
    enc = randomise(encoder(seed), seed + 5)
    with torch.no_grad():
        enc[3].theta.fill_(0.3)
    bound = lipschitz_upper_bound(enc, (1, 6, 6))
    assert bound <= 2.0 * (1 + 1e-5)                           # 1 / scale times layers that are each <= 1
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(8):
        x = torch.randn(1, 6, 6, dtype=torch.float64, generator=gen)
        worst = max(worst, jacobian_norm(enc, x))
        y = x + 1e-3 * torch.randn(x.shape, dtype=torch.float64, generator=gen)
        ratio = float((enc(x[None]) - enc(y[None])).norm() / (x - y).norm())
        assert ratio <= bound
    assert worst <= bound


def test_encoder_bounds_are_sound_with_no_extra_step():
    lip = encoder_bounds({"a": encoder(0), "b": nn.Sequential(AOLLinear(5, 6), MaxMin())}, {"a": (1, 6, 6), "b": (5,)})
    assert lip.sound and lip.source == "bound" and bool((lip.values <= torch.tensor([2.0, 1.0]) * (1 + 1e-5)).all())
