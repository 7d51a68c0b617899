"""Independent references for the bound tests (dense Jacobian SVD, sampled lower estimates), and checks
that the references themselves are right. The other tests/test_bounds_*.py import them from here."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings
from torch import nn

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact_operator_norm(layer: nn.Module, shape) -> float:
    """||J||_2 of the (affine) layer from its dense Jacobian, float64."""
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.unsqueeze(0)), x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item()


def empirical_lipschitz(f, shape, *, points: int = 6, pairs: int = 6, steps: int = 25, seed: int = 0) -> float:
    """Lower estimate of L(f): max Jacobian norm at random points + gradient ascent on the ratio
    ||f(x) - f(y)|| / ||x - y|| over pairs (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0)).reshape(-1), x)
        best = max(best, torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item())
    for _ in range(pairs):
        x = (torch.randn((1, *shape), generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
        y = (x.detach() + 0.05 * torch.randn((1, *shape), generator=gen, dtype=torch.float64)).requires_grad_(True)
        opt = torch.optim.Adam([x, y], lr=0.05)
        for _ in range(steps):
            ratio = (f(x) - f(y)).norm() / (x - y).norm().clamp_min(1e-12)
            best = max(best, ratio.item())
            opt.zero_grad()
            (-ratio).backward()
            opt.step()
    return best


def randomise_bn(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen) * 1.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2 + 0.05)
    return bn.eval()


def test_exact_operator_norm_is_the_largest_singular_value():
    layer = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]]))
    assert math.isclose(exact_operator_norm(layer, (3,)), 4.0, rel_tol=1e-12)


def test_empirical_lipschitz_is_a_lower_estimate_that_gets_close():
    found = empirical_lipschitz(lambda v: 3.0 * torch.tanh(v), (4,))      # L = 3, attained at 0
    assert 2.5 <= found <= 3.0 + 1e-9


def test_randomise_bn_gives_eval_mode_statistics():
    bn = randomise_bn(nn.BatchNorm1d(4), torch.Generator().manual_seed(0))
    assert not bn.training and bool((bn.running_var > 0).all())
