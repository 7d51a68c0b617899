"""Convolutions: exact operator norm on the input shape (dense path), sound Fourier path, never the
reshaped-kernel norm."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.bounds import lipschitz_upper_bound
from test_bounds_reference import FAST, exact_operator_norm

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@st.composite
def conv_layers(draw, transposed: bool = False):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    size = tuple(draw(st.integers(3, 9)) for _ in range(dims))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    if transposed:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        out_pad = tuple(draw(st.integers(0, s - 1)) for s in stride)
        out_pad = tuple(min(o, max(s, d) - 1) for o, s, d in zip(out_pad, stride, dilation))
        cls = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        try:
            layer = cls(c_in, c_out, k, stride=stride, padding=padding, output_padding=out_pad,
                        dilation=dilation, groups=groups)
            layer(torch.zeros(1, c_in, *size))
        except (RuntimeError, ValueError):
            layer = cls(c_in, c_out, k, stride=stride, padding=0, dilation=dilation, groups=groups)
        return layer, (c_in, *size)
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    padding = draw(st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = (1,) * dims
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    try:
        layer = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=mode)
        layer(torch.zeros(1, c_in, *size))
    except (RuntimeError, ValueError, NotImplementedError):
        layer = cls(c_in, c_out, k, stride=stride, padding=0, dilation=dilation, groups=groups)
        size = tuple(max(s, d * (kk - 1) + 1) for s, d, kk in zip(size, dilation, k))
    return layer, (c_in, *size)


@FAST
@given(conv_layers())
def test_conv_matches_exact_operator_norm(case):
    layer, shape = case
    exact = exact_operator_norm(layer, shape)
    bound = lipschitz_upper_bound(layer, shape)                      # small: exact (dense) path
    assert exact <= bound <= exact * (1 + 1e-3) + 1e-12, (layer, shape)
    fourier = lipschitz_upper_bound(layer, shape, conv_method="fourier")
    assert fourier >= exact, (layer, shape)                          # the large-input path is sound


@FAST
@given(conv_layers(transposed=True))
def test_conv_transpose_matches_exact_operator_norm(case):
    layer, shape = case
    exact = exact_operator_norm(layer, shape)
    assert exact <= lipschitz_upper_bound(layer, shape) <= exact * (1 + 1e-3) + 1e-12
    assert lipschitz_upper_bound(layer, shape, conv_method="fourier") >= exact


def test_conv_is_not_the_reshaped_kernel_norm():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1)
    exact = exact_operator_norm(layer, (3, 10, 10))
    kernel = torch.linalg.matrix_norm(layer.weight.detach().double().reshape(8, -1), ord=2).item()
    assert kernel < 0.6 * exact                     # the classic mistake under-estimates ~3x here
    assert exact <= lipschitz_upper_bound(layer, (3, 10, 10)) <= exact * (1 + 1e-3)


def test_fourier_is_exact_for_circular_same_convolutions_and_close_for_zero_padding():
    torch.manual_seed(0)
    circ = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")
    exact = exact_operator_norm(circ, (4, 8, 8))
    assert exact <= lipschitz_upper_bound(circ, (4, 8, 8), conv_method="fourier") <= exact * (1 + 1e-3)
    strided = nn.Conv2d(4, 6, 4, stride=2, padding=1, padding_mode="circular")
    exact = exact_operator_norm(strided, (4, 8, 8))
    assert exact <= lipschitz_upper_bound(strided, (4, 8, 8), conv_method="fourier") <= exact * (1 + 1e-3)
    zeros = nn.Conv2d(4, 6, 3, padding=1)
    exact = exact_operator_norm(zeros, (4, 16, 16))
    assert exact <= lipschitz_upper_bound(zeros, (4, 16, 16), conv_method="fourier") <= exact * 1.1


def test_large_conv_uses_fourier_and_stays_sound():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    exact = exact_operator_norm(layer, (2, 12, 12))
    auto = lipschitz_upper_bound(layer, (2, 12, 12), dense_max=10)   # forces the Fourier path
    assert auto == lipschitz_upper_bound(layer, (2, 12, 12), conv_method="fourier")
    assert exact <= auto <= 1.2 * exact
