"""Reductions across ``torch.distributed`` ranks; no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_max", "all_reduce_sum"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: Tensor, op) -> Tensor:
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise max over ranks (e.g. Lipschitz estimates)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Element-wise sum over ranks (e.g. gradient and radius sums of step 2)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)
