"""Linear layers: the bound is ||W||_2 to 1e-3, never below (dense SVD reference)."""

from __future__ import annotations


import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.bounds import lipschitz_upper_bound
from test_bounds_reference import FAST, exact_operator_norm

@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10_000))
def test_linear_matches_exact_norm(n_in, n_out, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    bound = lipschitz_upper_bound(layer, (n_in,))
    exact = exact_operator_norm(layer, (n_in,))
    assert exact <= bound <= exact * (1 + 1e-3)
