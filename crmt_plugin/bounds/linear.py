"""nn.Linear: on (*, in) the map is I kron W, whose l2 norm is ||W||_2 (the bias does not matter).

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> layer = nn.Linear(2, 2, bias=True)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    >>> round(lipschitz_upper_bound(layer, (2,)), 5)
    3.0
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .dense import matrix_norm
from .norm import FoldsBatchNorm
from .plan import Context, Shape
from .registry import LayerSite, lipschitz_rule

__all__ = ["LinearPlan"]


class LinearPlan(FoldsBatchNorm):
    """||diag(s) W||_2 (s: a folded BatchNorm1d's scale, else 1); estimate ||W v|| by power iteration."""

    def __init__(self, path: str, layer: nn.Linear) -> None:
        self.path, self.layer = path, layer
        self.bn = None
        self._v: Optional[Tensor] = None
        self._n_iter = 1

    def accepts_batchnorm(self, shape: Shape) -> bool:
        return len(shape) == 1           # BatchNorm1d on (B, C): per output feature

    def set_power_iterations(self, n: int) -> None:
        self._n_iter = int(n)

    def bound(self, ctx: Context) -> float:
        return ctx.record(self.path, matrix_norm(self.weight(float64=True)))

    def estimate(self) -> Tensor:
        """||W v|| with v from persistent power iterations (a lower estimate, differentiable in W)."""
        w = self.weight(float64=False)
        with torch.no_grad():
            wd = w.detach()
            if self._v is None or self._v.dtype != w.dtype or self._v.device != w.device:
                gen = torch.Generator().manual_seed(0)
                v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
                self._v = (v / v.norm()).to(w.dtype).to(w.device)
                n = 20
            else:
                n = self._n_iter
            for _ in range(n):
                v = wd.T @ (wd @ self._v)
                if v.norm() > 0:
                    self._v = v / v.norm()
        return torch.linalg.vector_norm(w @ self._v)


@lipschitz_rule(nn.Linear)
def linear_rule(layer: nn.Linear, site: LayerSite) -> LinearPlan:
    return LinearPlan(site.path, layer)
