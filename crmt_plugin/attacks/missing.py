"""Missing-modality helpers: replace modalities by zeros or a fill (e.g. the training mean)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._runtime import iterate_batches
from ..errors import CRMTError
from .base import check_inputs, resolve_modalities

__all__ = ["drop_modality", "modality_means"]

Number = Union[int, float]


def drop_modality(
    inputs: Mapping[str, Tensor],
    modalities: Union[str, Iterable[str]],
    fill: Optional[Union[Number, Tensor, Mapping[str, Union[Number, Tensor]]]] = None,
) -> Dict[str, Tensor]:
    """Replace modalities by zeros or by a fill value (e.g. the training mean): the missing-modality test.

    Example::

        >>> inputs = {"audio": torch.randn(4, 3, 5), "image": torch.rand(4, 1, 2, 2)}
        >>> x = drop_modality(inputs, "audio", fill={"audio": torch.ones(3, 5)})   # e.g. the training mean
        >>> x["image"] is inputs["image"], x["audio"].shape
        (True, torch.Size([4, 3, 5]))
        >>> drop_modality(inputs, ["audio"])["audio"].abs().sum()  # zeros by default
        tensor(0.)

    Args:
        modalities: a name or names to replace.
        fill: ``None`` (zeros), a number, a tensor broadcastable to one sample's shape (or the batch
            shape), or a mapping name -> such a value (modalities missing from it get zeros).

    Returns a new dict; untouched modalities are the very same tensors; replaced ones are fresh
    tensors in the input's device and dtype.
    """
    check_inputs(inputs)
    names = resolve_modalities(inputs, modalities, "drop_modality")
    out = dict(inputs)
    for n in names:
        x = inputs[n]
        value = fill.get(n) if isinstance(fill, Mapping) else fill
        if value is None:
            out[n] = torch.zeros_like(x)
            continue
        v = torch.as_tensor(value).to(device=x.device, dtype=x.dtype)
        try:
            out[n] = v.expand(x.shape).clone()
        except RuntimeError:
            raise CRMTError(
                f"drop_modality: fill for {n!r} has shape {tuple(v.shape)}, which does not broadcast to the "
                f"modality's tensor {tuple(x.shape)}; give one sample's shape {tuple(x.shape[1:])}"
            ) from None
    return out


def modality_means(
    loader: Iterable[Any],
    modalities: Optional[Union[str, Sequence[str]]] = None,
    *,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Any]]] = None,
) -> Dict[str, Tensor]:
    """Per-modality mean of one sample over a loader (accumulated in float64), e.g. the training mean.

    Example:

        >>> loader = [({"audio": torch.ones(2, 3), "image": torch.zeros(2, 1, 4)}, torch.tensor([0, 1]))]
        >>> means = modality_means(loader)           # loader yields (inputs_dict, y)
        >>> means["image"].shape                     # one sample's shape
        torch.Size([1, 4])
        >>> modality_means([(b[0]["audio"], b[0]["image"]) for b in loader],   # any other layout
        ...                prepare_batch=lambda b: ({"audio": b[0], "image": b[1]}, None))["audio"]
        tensor([1., 1., 1.])

    Args:
        modalities: the names to average (default: every tensor of the first batch).
        max_batches: stop after this many batches.
        prepare_batch: maps a loader item to ``(inputs_dict, y)`` (``y`` is ignored), as in
            :func:`~crmt_plugin.evaluation.evaluate_robustness`; without it a batch is
            ``(inputs_dict, y)`` or the inputs dict itself.

    Returns ``{name: tensor}`` in each modality's dtype and device, ready for :func:`drop_modality`.
    """
    sums: Dict[str, Tensor] = {}
    dtypes: Dict[str, torch.dtype] = {}
    count = 0
    names: Optional[Tuple[str, ...]] = None
    if prepare_batch is not None:
        prepared = iterate_batches(loader, prepare_batch, max_batches=max_batches)
        batches: Iterable[Any] = (inputs for inputs, _ in prepared)
    else:
        batches = (b[0] if isinstance(b, (tuple, list)) else b for i, b in zip(_until(max_batches), loader))
    for i, inputs in enumerate(batches):
        check_inputs(inputs)
        if names is None:
            names = resolve_modalities(inputs, modalities, "modality_means")
        for n in names:
            if n not in inputs:
                raise CRMTError(f"modality_means: batch {i} lacks modality {n!r}; found {list(inputs)}")
            x = inputs[n]
            s = x.detach().to(torch.float64).sum(dim=0)
            if n in sums:
                if sums[n].shape != s.shape:
                    raise CRMTError(
                        f"modality_means: modality {n!r} changes sample shape from {tuple(sums[n].shape)} "
                        f"to {tuple(s.shape)} in batch {i}"
                    )
                sums[n] = sums[n] + s.to(sums[n].device)
            else:
                sums[n] = s
                dtypes[n] = x.dtype
        count += int(inputs[names[0]].shape[0])
    if count == 0 or names is None:
        raise CRMTError("modality_means: the loader yielded no samples")
    return {n: (sums[n] / count).to(dtypes[n]) for n in names}


def _until(max_batches: Optional[int]) -> Iterable[int]:
    i = 0
    while max_batches is None or i < max_batches:
        yield i
        i += 1
