"""Sum-of-heads fusion: a model that adds per-modality logits ``sum_m Linear_m(phi^(m)) `` is CRMT's
late fusion too. :class:`SummedHeadShare` replaces each modality's ``nn.Linear(d_m, K)`` and returns
that modality's share of one shared :class:`~crmt_plugin.head.CRMTHead`, so the model's own sum is
the CRMT head's fused logits. :class:`~crmt_plugin.CRMTWrapper` builds them from
``head={"audio": "audio_head", ...}``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CRMTError
from .head import CRMTHead

__all__ = ["SummedHeadShare"]


class SummedHeadShare(nn.Module):
    """One modality's share of a sum-of-heads fusion: replaces that modality's ``nn.Linear(d_m, K)``.

    ``share(phi^(m)) = a^(m) * (W~^(m) phi^(m)) (+ b for the share that carries the bias)``, so that
    the model's own sum of per-modality logits is the CRMT head's fused logits
    ``sum_m a^(m) * z^(m) + b``. All shares use one :class:`CRMTHead`; the first share holds it as a
    submodule (its parameters appear once, under that share), the others refer to it.
    """

    def __init__(self, head: CRMTHead, modality: str, *, owner: bool, carries_bias: bool, has_bias: bool) -> None:
        super().__init__()
        if owner:
            self.head = head
        else:  # not registered: the owner share holds the parameters
            object.__setattr__(self, "_shared_head", head)
        self.modality = modality
        self.owner = owner
        self.carries_bias = carries_bias
        self.has_bias = has_bias
        self.in_features = head.widths[modality]
        self.out_features = head.num_classes
        self._last: Optional[Tuple[Tensor, Tensor]] = None

    @property
    def crmt_head(self) -> CRMTHead:
        """The shared CRMT head."""
        return self.head if self.owner else self.__dict__["_shared_head"]

    def forward(self, features: Tensor) -> Tensor:
        head = self.crmt_head
        if features.shape[-1] != self.in_features:
            raise CRMTError(f"the head of modality {self.modality!r} expected features with last dimension "
                            f"{self.in_features}, found shape {tuple(features.shape)}")
        index = head.modalities.index(self.modality)
        z = F.linear(features, head.unimodal_weight(self.modality))
        share = head.integration_weights()[index] * z
        if self.carries_bias:
            share = share + head.bias
        self._last = (z, features)
        return share

    def pop_last(self) -> Tuple[Tensor, Tensor]:
        """(z^(m), phi^(m)) of the last call (and forget them)."""
        last, self._last = self._last, None
        if last is None:
            raise CRMTError(f"the head of modality {self.modality!r} was not called during the model's forward: "
                            "check that `head` maps each modality to the nn.Linear the model uses")
        return last

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, in_features={self.in_features}, out_features={self.out_features}"
