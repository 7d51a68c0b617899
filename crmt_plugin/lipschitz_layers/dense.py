"""A 1-Lipschitz dense layer: AOL-rescaled ``nn.Linear``.

    y = W diag(d) x + b,   d_i = (sum_j |W^T W|_ij)^(-1/2)        (x: (*, in), y: (*, out))

||W diag(d)||_2 <= 1 for every W (:mod:`~crmt_plugin.lipschitz_layers.rescaling`), so the layer is 1-Lipschitz
by construction; its bounds rule (:mod:`crmt_plugin.bounds.lipschitz_layers`) returns the exact spectral norm
of the effective weight (<= 1, rounded up).

    >>> import torch
    >>> layer = AOLLinear(6, 4)
    >>> layer(torch.randn(3, 6)).shape
    torch.Size([3, 4])
    >>> bool(torch.linalg.matrix_norm(layer.effective_weight().double(), ord=2) <= 1 + 1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rescaling import aol_dense_scale

__all__ = ["AOLLinear"]


class AOLLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` made 1-Lipschitz by AOL rescaling (see the module docstring).

    ``weight`` (out, in) is free (orthogonal initialisation: AOL leaves an orthogonal W unchanged);
    ``effective_weight()`` is what the forward applies.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.orthogonal_(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)

    def effective_weight(self) -> Tensor:
        """W diag(d) (out, in), the weight the forward applies; ||.||_2 <= 1."""
        return self.weight * aol_dense_scale(self.weight).unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
