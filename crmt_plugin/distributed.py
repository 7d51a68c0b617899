"""Reductions across ``torch.distributed`` ranks; no-ops in a single process.

Every collective here is reached by every rank, whatever its data: a rank with no batches, or one
whose batch failed a check, still joins the reduction (with a neutral value and a flag), and the
error is then raised on *every* rank. Raising on one rank only would leave the others waiting in
the next collective until the process-group timeout (30 minutes by default).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CRMTError

__all__ = ["is_distributed", "all_reduce_max", "all_reduce_sum", "raise_on_every_rank"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank.

    Example (a single process)::

        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: Tensor, op) -> Tensor:
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise max over ranks (e.g. Lipschitz estimates), any shape; a detached copy under
    ``torch.distributed``, the tensor itself in a single process.

    Example (a single process: nothing to reduce)::

        >>> all_reduce_max(torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Element-wise sum over ranks (e.g. gradient and radius sums of step 2), any shape; a detached
    copy under ``torch.distributed``, the tensor itself in a single process.

    Example (a single process)::

        >>> all_reduce_sum(torch.tensor([2.0]))
        tensor([2.])
    """
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def raise_on_every_rank(failure: Optional[BaseException], device: torch.device, what: str) -> None:
    """One collective: re-raise ``failure`` on the rank that had it, and a :class:`CRMTError` on
    every other rank when any rank failed. Single process: raise ``failure`` if given.

    Example (a single process)::

        >>> raise_on_every_rank(None, torch.device("cpu"), "step 2")          # nothing failed
        >>> raise_on_every_rank(ValueError("bad batch"), torch.device("cpu"), "step 2")
        Traceback (most recent call last):
            ...
        ValueError: bad batch
    """
    if not is_distributed():
        if failure is not None:
            raise failure
        return
    failed = all_reduce_sum(torch.tensor([float(failure is not None)], dtype=torch.float64, device=device))
    if failure is not None:
        raise failure
    if float(failed[0]) > 0:
        raise CRMTError(
            f"{what} failed on {int(failed[0])} other rank(s) (see their error); every rank stops here "
            "so that none waits forever in the next collective"
        )
