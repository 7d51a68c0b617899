"""Activations: the bound is sup |f'| (checked on a dense grid), never below."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from crmt_plugin.bounds import lipschitz_upper_bound

@pytest.mark.parametrize("layer, expected", [
    (nn.ReLU(), 1.0), (nn.LeakyReLU(0.2), 1.0), (nn.LeakyReLU(-3.0), 3.0), (nn.Tanh(), 1.0),
    (nn.Sigmoid(), 0.25), (nn.GELU(), 1.1289), (nn.GELU(approximate="tanh"), 1.1289), (nn.SiLU(), 1.0998),
    (nn.ELU(2.0), 2.0), (nn.Softplus(), 1.0), (nn.Hardswish(), 1.5), (nn.Mish(), 1.0885), (nn.SELU(), 1.7581),
    (nn.Hardsigmoid(), 1 / 6), (nn.CELU(0.5), 1.0), (nn.Softsign(), 1.0),
])
def test_activation_bounds_are_sup_of_derivative(layer, expected):
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    sup = grad.abs().max().item()
    bound = lipschitz_upper_bound(layer, (5,))
    assert sup <= bound <= sup * (1 + 1e-4) + 1e-9
    assert bound == pytest.approx(expected, abs=1e-4)
