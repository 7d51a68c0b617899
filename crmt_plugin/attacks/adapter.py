"""A single-tensor view of one modality, for third-party single-input attack libraries."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from torch import Tensor, nn

from .._runtime import logits_of
from ..errors import CRMTError
from .base import check_inputs, resolve_modalities

__all__ = ["ModalityAdapter"]


class ModalityAdapter(nn.Module):
    """One modality of a multi-modal model as a single-tensor module, the other modalities held fixed.

    Lets single-input attack libraries (torchattacks, ART, ...) attack one modality::

        adapter = ModalityAdapter(model, inputs, "image", shape=(1, 28, 28))
        x = adapter.select()                               # (B, 1, 28, 28): the attacked modality
        x_adv = torchattacks.PGDL2(adapter, eps=1.0, alpha=0.2, steps=10)(x, y)
        adv_inputs = adapter.merge(x_adv)                  # full dict, image replaced
        adapter(x_adv).shape                               # logits (B, K)

    Args:
        model: callable on the dict of tensors returning logits or an object with ``.logits``.
        inputs: the batch; every other modality is held at these values (same batch order).
        modality: the name of the modality the adapter exposes.
        shape: optional per-sample shape of the exposed tensor (e.g. ``(1, H, W)`` so that libraries
            expecting 4-D images work with 2-D features); reshaped back before the model sees it.

    Caveat: torchattacks assumes inputs in [0, 1] and clamps to [0, 1] internally (and refuses
    inputs outside it); compare it with :class:`PGD` only on data inside [0, 1], or give
    ``PGD(..., bounds={name: (0, 1)})``. torchattacks also switches the adapter's model to eval
    mode and back via ``.train()``, which does not restore per-submodule flags exactly.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        inputs: Mapping[str, Tensor],
        modality: str,
        shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        check_inputs(inputs)
        (name,) = resolve_modalities(inputs, [modality], "ModalityAdapter")
        if isinstance(model, nn.Module):
            self.model = model
        else:
            object.__setattr__(self, "model", model)
        self.modality = name
        self._inputs = dict(inputs)  # held as given: merge() returns the very same tensors
        self._sample_shape = tuple(inputs[name].shape[1:])
        self._shape = tuple(shape) if shape is not None else self._sample_shape
        if math.prod(self._shape) != math.prod(self._sample_shape):
            raise CRMTError(
                f"ModalityAdapter: shape {self._shape} has {math.prod(self._shape)} elements per sample, "
                f"modality {name!r} has {math.prod(self._sample_shape)} (shape {self._sample_shape})"
            )

    def select(self) -> Tensor:
        """The exposed modality of the held batch, shape ``(B, *shape)``."""
        x = self._inputs[self.modality]
        return x.reshape((x.shape[0],) + self._shape)

    def merge(self, x: Tensor) -> Dict[str, Tensor]:
        """The full inputs dict with the exposed modality replaced by ``x`` (``(B, *shape)``)."""
        batch = self._inputs[self.modality].shape[0]
        if x.shape[0] != batch or tuple(x.shape[1:]) != self._shape:
            raise CRMTError(
                f"ModalityAdapter: expected a tensor of shape {(batch,) + self._shape} for modality "
                f"{self.modality!r}, found {tuple(x.shape)} (the other modalities are held for batch size {batch})"
            )
        out = dict(self._inputs)
        out[self.modality] = x.reshape((batch,) + self._sample_shape)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model, self.merge(x))

    def extra_repr(self) -> str:
        held = sorted(k for k in self._inputs if k != self.modality)
        return f"modality={self.modality!r}, shape={self._shape}, held={held}"
