"""Threat models as small objects: the l2 and l-infinity balls, in a registry keyed by norm.

A ball acts on a *group*: the modalities that share one budget (all attacked modalities for a joint
budget, one modality for a per-modality budget). Every method takes the group's per-modality
tensors as a list (each ``(B, ...)``) and a per-sample budget ``eps`` of shape ``(B,)``:

* ``size(deltas)`` - the per-sample norm of the group's perturbation, ``(B,)``;
* ``random(noise, like, eps)`` - a random start inside the ball;
* ``step(grads, size)`` - the steepest-ascent step of length ``size`` ``(B,)`` in this norm;
* ``project(deltas, eps)`` - the closest point of the ball.

A new norm is one class registered with :func:`register_ball`.

Example:

    >>> ball = get_ball("l2")
    >>> d = ball.project([torch.tensor([[3.0, 4.0]])], torch.tensor([1.0]))
    >>> d[0], ball.size(d)
    (tensor([[0.6000, 0.8000]]), tensor([1.]))
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Type

import torch
from torch import Tensor

from ..errors import CRMTError

__all__ = ["Ball", "L2Ball", "LinfBall", "register_ball", "get_ball", "BALLS", "flat_sq_norm", "bcast"]

Noise = Callable[[Tensor, str], Tensor]  # (like, "normal" | "uniform" | "sign") -> a tensor shaped like `like`


def flat_sq_norm(t: Tensor) -> Tensor:
    """Per-sample squared l2 norm (B,) in at least float32 (never underflows in half precision)."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return t.reshape(t.shape[0], -1).to(acc).pow(2).sum(dim=1)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching ``like``, in ``like``'s dtype."""
    return v.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny if t.is_floating_point() else 1e-30


class Ball:
    """Base class of a norm ball; subclasses implement the four operations."""

    norm = ""

    def size(self, deltas: List[Tensor]) -> Tensor:
        raise NotImplementedError

    def random(self, noise: Noise, like: List[Tensor], eps: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def step(self, grads: List[Tensor], size: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def project(self, deltas: List[Tensor], eps: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


BALLS: Dict[str, Ball] = {}


def register_ball(norm: str) -> Callable[[Type[Ball]], Type[Ball]]:
    """Class decorator: make a :class:`Ball` subclass available as ``norm=...`` in every attack."""

    def add(cls: Type[Ball]) -> Type[Ball]:
        cls.norm = norm
        BALLS[norm] = cls()
        return cls

    return add


def get_ball(norm: str) -> Ball:
    """The registered ball of a norm name (``"l2"``, ``"linf"``)."""
    if norm not in BALLS:
        raise CRMTError(f"norm must be one of {tuple(BALLS)}, found {norm!r}")
    return BALLS[norm]


@register_ball("l2")
class L2Ball(Ball):
    """``sqrt(sum_m ||delta_m||_2^2) <= eps`` over the group."""

    def size(self, deltas: List[Tensor]) -> Tensor:
        return sum(flat_sq_norm(d) for d in deltas).sqrt()  # type: ignore[union-attr]

    def random(self, noise: Noise, like: List[Tensor], eps: Tensor) -> List[Tensor]:
        # a uniform direction (joint over the group) and a radius uniform in [0, eps] (as torchattacks);
        # not uniform in volume, which in high dimension starts every run on the sphere
        gauss = [noise(x, "normal") for x in like]
        norm = self.size(gauss)
        u = noise(norm, "uniform")
        scale = torch.where(norm > 0, eps.to(norm) * u / norm.clamp_min(1e-30), torch.zeros_like(norm))
        return [(g * bcast(scale, g)).to(x.dtype) for g, x in zip(gauss, like)]

    def step(self, grads: List[Tensor], size: Tensor) -> List[Tensor]:
        gnorm = self.size(grads)
        # safe normalisation: a sample whose gradient is exactly zero (or underflows) does not move
        scale = torch.where(gnorm > 0, size.to(gnorm) / gnorm.clamp_min(1e-30), torch.zeros_like(gnorm))
        return [g * bcast(scale, g) for g in grads]

    def project(self, deltas: List[Tensor], eps: Tensor) -> List[Tensor]:
        norm = self.size(deltas)
        e = eps.to(norm.dtype)
        factor = torch.where(norm > e, e / norm.clamp_min(_tiny(norm)), torch.ones_like(norm))
        return [d * bcast(factor, d) for d in deltas]


@register_ball("linf")
class LinfBall(Ball):
    """``max_m ||delta_m||_inf <= eps`` over the group (each modality in the box ``[-eps, eps]``)."""

    def size(self, deltas: List[Tensor]) -> Tensor:
        sizes = [d.reshape(d.shape[0], -1).abs().amax(dim=1) if math.prod(d.shape[1:]) else d.new_zeros(d.shape[0])
                 for d in deltas]
        return torch.stack(sizes).amax(dim=0)

    def random(self, noise: Noise, like: List[Tensor], eps: Tensor) -> List[Tensor]:
        out = []
        for x in like:
            u = noise(x, "uniform") * 2 - 1
            out.append((u * bcast(eps, u)).to(x.dtype))
        return out

    def step(self, grads: List[Tensor], size: Tensor) -> List[Tensor]:
        return [bcast(size, g) * g.sign() for g in grads]

    def project(self, deltas: List[Tensor], eps: Tensor) -> List[Tensor]:
        return [torch.clamp(d, -bcast(eps, d), bcast(eps, d)) for d in deltas]
