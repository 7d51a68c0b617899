"""Pooling: exact norm of average pooling, tight bound of max pooling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crmt_plugin.bounds import lipschitz_upper_bound
from test_bounds_reference import exact_operator_norm

@pytest.mark.parametrize("pool, shape", [
    (nn.AvgPool2d(3, stride=1), (2, 7, 7)), (nn.AvgPool2d(3, stride=2, padding=1), (1, 9, 9)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True), (1, 8, 9)),
    (nn.AvgPool1d(4, stride=3), (2, 11)), (nn.AdaptiveAvgPool2d((2, 3)), (2, 7, 5)),
    (nn.AdaptiveAvgPool1d(1), (3, 10)), (nn.AvgPool2d(2), (1, 8, 8)),
])
def test_average_pooling_matches_exact_norm(pool, shape):
    exact = exact_operator_norm(pool, shape)
    bound = lipschitz_upper_bound(pool, shape)
    assert exact <= bound <= exact * (1 + 1e-3)
    assert lipschitz_upper_bound(pool, shape, dense_max=1) >= exact     # large-input path (Schur / Fourier)


def test_global_average_pooling_is_one_over_sqrt_hw():
    assert lipschitz_upper_bound(nn.AdaptiveAvgPool2d(1), (8, 4, 5)) == pytest.approx(1 / math.sqrt(20), rel=1e-5)


@pytest.mark.parametrize("pool, shape, expected", [
    (nn.MaxPool2d(2), (3, 8, 8), 1.0), (nn.MaxPool1d(3, stride=1), (1, 7), math.sqrt(3)),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 9, 9), 2.0), (nn.AdaptiveMaxPool2d(1), (2, 5, 5), 1.0),
    (nn.MaxPool1d(2, stride=1, dilation=2), (1, 8), math.sqrt(2)),
])
def test_max_pooling_bound_is_tight(pool, shape, expected):
    bound = lipschitz_upper_bound(pool, shape)
    assert bound == pytest.approx(expected, rel=1e-9)
    # attained: bump the element that is the max of the most windows
    x = torch.zeros((1, *shape), dtype=torch.float64)
    flat = x.view(-1)
    best = 0.0
    for i in range(flat.numel()):
        y = x.clone()
        y.view(-1)[i] = 1.0
        best = max(best, (pool(y) - pool(x)).norm().item())
    assert best == pytest.approx(expected, rel=1e-9)
