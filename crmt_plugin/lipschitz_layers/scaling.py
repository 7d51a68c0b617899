"""Input scaling for Lipschitz encoders: ``(x - mean) / s`` with one scale per modality (or per channel, floored).

    y = (x - mean) / s,      L = 1 / min(s)                                   (exact)

A per-feature standardisation divides by each feature's std; one near-constant feature (std 1e-3) makes the
constant 1000 and every sound radius 1000x smaller. For a Lipschitz encoder use one scale per modality
(``ModalityScale.from_data(x)``) or per-channel scales with a floor (``per_channel=True, floor=...``).

    >>> import torch
    >>> x = torch.randn(100, 3, 8) * torch.tensor([1.0, 2.0, 0.001]).view(1, 3, 1)
    >>> s = ModalityScale.from_data(x)                 # one scale: constant 1 / std(x)
    >>> round(s.lipschitz() * float(x.std(unbiased=False)), 4)
    1.0
    >>> ModalityScale.from_data(x, per_channel=True, floor=0.5).scale.flatten().tolist()[2]
    0.5
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import CRMTError

__all__ = ["ModalityScale"]


class ModalityScale(nn.Module):
    """``(x - mean) / scale`` with fixed buffers; ``scale`` > 0 broadcasts against one sample."""

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CRMTError(f"every scale must be finite and > 0, found min {float(scale.min())}")
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    @classmethod
    def from_data(cls, x: Tensor, *, per_channel: bool = False, floor: Optional[float] = None) -> "ModalityScale":
        """From training data (N, ...): one mean and std over everything, or per channel (dim 1) with
        std clamped to ``floor`` (default: 0.1 x the overall std)."""
        x = x.detach().double()
        overall = float(x.std(unbiased=False)) or 1.0
        if not per_channel or x.dim() < 2:
            return cls(torch.tensor(float(x.mean())), torch.tensor(overall))
        dims = [0] + list(range(2, x.dim()))
        shape = (x.shape[1],) + (1,) * (x.dim() - 2)
        mean = x.mean(dim=dims).view(shape)
        std = x.std(dim=dims, unbiased=False).view(shape)
        low = 0.1 * overall if floor is None else float(floor)
        if not low > 0:
            raise CRMTError(f"floor must be > 0, found {floor!r}")
        return cls(mean.float(), std.clamp_min(low).float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale

    def lipschitz(self) -> float:
        """1 / min(scale) in float64 (exact up to rounding; the bounds rule rounds it up)."""
        return float(1.0 / self.scale.double().min())
