"""MaxMin (GroupSort of group size 2): a 1-Lipschitz, gradient-norm-preserving activation.

    MaxMin(x) = cat( max(x_a, x_b), min(x_a, x_b) ) along ``dim``,   x = cat(x_a, x_b) (two halves)

Per pair (a, b) it sorts two numbers: a permutation of its input on each region, so its Jacobian is a
permutation matrix wherever it exists and its l2 Lipschitz constant is exactly 1 (ReLU's is 1 too, but it
halves gradients on average; Anil et al. 2019).

    >>> import torch
    >>> MaxMin()(torch.tensor([[1.0, -2.0, 3.0, 0.5]]))
    tensor([[ 3.0000,  0.5000,  1.0000, -2.0000]])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import CRMTError

__all__ = ["MaxMin"]


class MaxMin(nn.Module):
    """MaxMin over ``dim`` (default 1, the channel / feature dimension; its size must be even)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[self.dim]
        if size % 2:
            raise CRMTError(f"MaxMin needs an even size along dim {self.dim}, found {size} (shape {tuple(x.shape)})")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
