"""Global l2-norm pooling: the l2 norm of each channel over all positions, exactly 1-Lipschitz.

    y_c = sqrt( sum_p x_{c,p}^2 + e )        x: (B, C, *spatial) -> y: (B, C),  e = ``eps`` (1e-12)

Per channel | ||u|| - ||v|| | <= ||u - v|| (and sqrt(t^2 + e) is 1-Lipschitz in t), so summing the squares
over channels gives ||y(x) - y(x')|| <= ||x - x'||; the constant is exactly 1 (x' = 2x with e -> 0).
Global *average* pooling instead has constant 1 / sqrt(#positions): it shrinks perturbations and signals alike.

    >>> import torch
    >>> L2NormPool()(torch.ones(2, 3, 4, 4))
    tensor([[4., 4., 4.],
            [4., 4., 4.]])
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import CRMTError

__all__ = ["L2NormPool"]


class L2NormPool(nn.Module):
    """(B, C, *spatial) -> (B, C): sqrt(sum over positions of x^2 + eps)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if not eps >= 0:
            raise CRMTError(f"eps must be >= 0, found {eps!r}")
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise CRMTError(f"L2NormPool needs (B, C, *spatial), found shape {tuple(x.shape)}")
        return (x.flatten(2).pow(2).sum(dim=2) + self.eps).sqrt()
