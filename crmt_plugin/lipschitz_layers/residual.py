"""A residual block with a sound constant: the convex combination ``(1 - a) x + a f(x)``, a in [0, 1].

    y = (1 - a) x + a f(x),   a = sigmoid(theta)        L(y) <= (1 - a) + a L(f)  (<= 1 when L(f) <= 1)

``x + f(x)`` would have constant 1 + L(f): a chain of n such blocks 2^n. The convex combination keeps a
chain of 1-Lipschitz blocks 1-Lipschitz and still starts near the identity (``theta`` = logit(a_0)).

    >>> import torch
    >>> from crmt_plugin.lipschitz_layers import AOLLinear, MaxMin
    >>> block = ConvexResidual(torch.nn.Sequential(AOLLinear(8, 8), MaxMin()), init=0.25)
    >>> block(torch.randn(3, 8)).shape, [round(float(c), 2) for c in block.coefficients()]
    (torch.Size([3, 8]), [0.75, 0.25])
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from ..errors import CRMTError

__all__ = ["ConvexResidual"]


class ConvexResidual(nn.Module):
    """``(1 - a) x + a branch(x)`` with a learnable a = sigmoid(theta) in (0, 1); ``branch`` keeps the shape."""

    def __init__(self, branch: nn.Module, init: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < float(init) < 1.0:
            raise CRMTError(f"init (the starting a) must be in (0, 1), found {init!r}")
        self.branch = branch
        self.theta = nn.Parameter(torch.tensor(math.log(init / (1.0 - init))))

    def coefficients(self) -> Tuple[Tensor, Tensor]:
        """(1 - a, a): the weights of the shortcut and the branch, as the forward applies them."""
        a = torch.sigmoid(self.theta)
        return 1.0 - a, a

    def forward(self, x: Tensor) -> Tensor:
        skip, gain = self.coefficients()
        return skip * x + gain * self.branch(x)
