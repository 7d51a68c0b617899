"""Certified robustness radii of the CRMT head (spec §3), vectorised over samples and classes.

For a sample classified correctly as y, with fused margins m_k = h_y - h_k:

    joint (all modalities perturbed, ||eps|| = sqrt(sum_m ||eps^(m)||^2)):
        r(x)     = min_{k != y}  m_k / sqrt( sum_m D_k^(m)^2 )
    modality m perturbed alone:
        r^(m)(x) = min_{k != y}  m_k / D_k^(m)

with the per-modality denominator D_k^(m), a Lipschitz constant of x^(m) -> a_y z_y - a_k z_k:

    "paper":  D_k^(m) = a_y^(m) tau_y^(m) + a_k^(m) tau_k^(m)                       (any constants)
    "tight":  D_k^(m) = L^(m) ||a_y^(m) W~_y^(m) - a_k^(m) W~_k^(m)||
                      = L^(m) sqrt(a_y^2 + a_k^2)   for orthonormal rows           (encoder constants L^(m))

"tight" needs per-modality encoder constants L^(m); it is never larger than "paper" with
tau = L. Misclassified samples (some m_k <= 0) get radius 0. The min runs over *all* k != y.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .errors import CRMTError
from .lipschitz import LipschitzConstants

__all__ = ["Certificate", "radii_from_unimodal"]


@dataclass
class Certificate:
    """Certified radii of a batch.

    Attributes:
        radius: (B,) joint l2 radius; no perturbation of all modalities with
            sqrt(sum_m ||eps^(m)||^2) < radius changes the prediction. 0 where misclassified.
        radius_per_modality: {name: (B,)} radius when only that modality is perturbed.
        correct: (B,) bool, the sample is classified as its label (strict margin).
        sound: True only when the Lipschitz constants are guaranteed upper bounds.
        denominator: ``"paper"`` or ``"tight"`` (see module docs).
        source: where the Lipschitz constants came from.

    Example::

        >>> cert = crmt.certify(inputs, y, lipschitz=lip)
        >>> cert.certified_accuracy([0.0, 0.5, 1.0])        # fraction with radius >= r
    """

    radius: Tensor
    radius_per_modality: Dict[str, Tensor]
    correct: Tensor
    sound: bool
    denominator: str
    source: str

    def certified_accuracy(self, radii: Sequence[float], modality: Optional[str] = None) -> Tensor:
        """Fraction of samples classified correctly with (joint or one modality's) radius >= each r:
        (len(radii),). Misclassified samples are never certified, not even at r = 0."""
        radius = self.radius if modality is None else self.radius_per_modality[modality]
        thresholds = torch.as_tensor(list(radii), dtype=radius.dtype, device=radius.device)
        if radius.numel() == 0:
            return torch.zeros_like(thresholds)
        certified = (radius.unsqueeze(0) >= thresholds.unsqueeze(1)) & self.correct.unsqueeze(0)
        return certified.to(radius.dtype).mean(dim=1)


def resolve_denominator(denominator: str, lipschitz: LipschitzConstants) -> str:
    if denominator == "auto":
        return "paper" if lipschitz.per_class else "tight"
    if denominator == "tight" and lipschitz.per_class:
        raise CRMTError(
            "the 'tight' denominator needs per-modality encoder constants L^(m) (shape (M,)), found "
            f"per-class constants of shape {tuple(lipschitz.values.shape)}; use denominator='paper'"
        )
    if denominator not in ("paper", "tight"):
        raise CRMTError(f"denominator must be 'auto', 'paper' or 'tight', found {denominator!r}")
    return denominator


def _denominators(
    y: Tensor, a: Tensor, lipschitz: LipschitzConstants, kind: str, gram: Optional[Tensor]
) -> Tensor:
    """D (B, M, K): Lipschitz constant of x^(m) -> a_y z_y - a_k z_k, per sample, modality, class."""
    num_classes = a.shape[1]
    a_y = rearrange(a[:, y], "m b -> b m")
    if kind == "paper":
        tau = lipschitz.per_class_values(num_classes).to(a)
        tau_y = rearrange(tau[:, y], "m b -> b m")
        return rearrange(a_y * tau_y, "b m -> b m 1") + rearrange(a * tau, "m k -> 1 m k")
    if gram is None:
        raise CRMTError("the 'tight' denominator needs the Gram matrices of W~ (M, K, K)")
    L = lipschitz.values.to(a)  # (M,)
    g_yy = rearrange(gram.diagonal(dim1=1, dim2=2)[:, y], "m b -> b m")
    g_kk = gram.diagonal(dim1=1, dim2=2)  # (M, K)
    g_yk = rearrange(gram[:, y, :], "m b k -> b m k")
    sq = (a_y**2 * g_yy).unsqueeze(2) + (a**2 * g_kk).unsqueeze(0) - 2 * a_y.unsqueeze(2) * a.unsqueeze(0) * g_yk
    # k = y is excluded from every min; a placeholder there keeps sqrt's gradient finite.
    is_label = torch.nn.functional.one_hot(y, num_classes).bool().unsqueeze(1)
    sq = torch.where(is_label, torch.ones_like(sq), sq.clamp_min(0))
    return rearrange(L, "m -> 1 m 1") * sq.sqrt()


def radii_from_unimodal(
    z: Tensor,
    a: Tensor,
    bias: Tensor,
    y: Tensor,
    lipschitz: LipschitzConstants,
    *,
    denominator: str = "auto",
    gram: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Joint and per-modality radii from uni-modal logits; differentiable in ``a``.

    Args:
        z: (B, M, K) uni-modal logits z^(m).
        a: (M, K) integration weights (>= 0).
        bias: (K,) shared bias.
        y: (B,) labels.
        lipschitz: constants aligned with the M modalities.
        gram: (M, K, K) Gram matrices W~ W~^T (needed for ``"tight"``).

    Returns:
        ``(radius (B,), radius_per_modality (B, M), correct (B,))``.
    """
    kind = resolve_denominator(denominator, lipschitz)
    fused = torch.einsum("bmk,mk->bk", z, a) + bias
    margins = fused.gather(1, y.unsqueeze(1)) - fused  # (B, K), m_k = h_y - h_k
    is_label = torch.nn.functional.one_hot(y, z.shape[2]).bool()
    correct = (margins > 0).logical_or(is_label).all(dim=1)
    denom = _denominators(y, a, lipschitz, kind, gram).clamp_min(torch.finfo(z.dtype).tiny)  # (B, M, K)
    inf = torch.tensor(float("inf"), dtype=z.dtype, device=z.device)
    joint = torch.where(is_label, inf, margins / denom.pow(2).sum(dim=1).sqrt()).amin(dim=1)
    per_modality = torch.where(is_label.unsqueeze(1), inf, margins.unsqueeze(1) / denom).amin(dim=2)
    joint = torch.where(correct, joint, torch.zeros_like(joint))
    per_modality = torch.where(correct.unsqueeze(1), per_modality, torch.zeros_like(per_modality))
    return joint, per_modality, correct
