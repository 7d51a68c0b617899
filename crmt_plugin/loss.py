"""The CRMT step-1 objective: cross-entropy on the fused logits plus a uni-modal margin regulariser.

    L1 = CE(h(x), y) + rho * penalty( s^(m) (z_k^(m) - z_y^(m)) over m and k != y )

where z^(m) (B, K) are the uni-modal logits and s^(m) is a per-sample scale:

* ``margin="relative"`` (default): s^(m) = temperature / ||phi^(m)(x^(m))||. The margins are measured
  relative to the feature norm (an angular margin, bounded by sqrt(2) * temperature), so the term
  cannot be "won" by inflating the features while a^(m) shrinks — the scale degeneracy of the
  paper's raw form (see docs/method.md).
* ``margin="raw"``: s^(m) = 1, the paper's formula exactly (unbounded below; pair it with weight
  decay).

``penalty`` is what is done with the scaled negative margins d_k^(m) = s^(m) (z_k^(m) - z_y^(m)):

* ``"hinge"`` (default for the relative margin): max(0, LSE - log(n) + margin_target), with
  LSE = log sum_{m, k != y} exp(d_k^(m)) and n = M (K - 1) terms. It stops pushing a sample once its
  smooth-min margin log(n) - LSE (between the smallest and the mean scaled margin) reaches the target
  (default 3.0, i.e. a cosine gap of 0.3 at temperature 10). Without the stop, the term keeps
  pushing every margin forever, and where a modality is weak it trades the fused model's fit for
  uni-modal margins (docs/method.md, "Step 1 on imbalanced data").
* ``"logsumexp"``: LSE itself, the paper's smooth max (the default with ``margin="raw"``: the
  paper's formula exactly). Never stops pushing.
* ``"sigmoid"``: sum_m sigmoid( log sum_{k != y} exp(d_k^(m)) ) = sum_m (1 - softmax(s^(m) z^(m))_y),
  each modality's own probability of error: bounded, it stops pushing both where a margin is reached
  and where a modality cannot be right (it can then give up on a weak modality altogether).

Everything is computed with ``logsumexp`` in at least float32, so logits of any size (and bf16/fp16
autocast) never overflow.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._runtime import check_labels, reduce_per_sample
from .errors import CRMTError

__all__ = ["crmt_loss", "margin_loss"]

MarginKind = str  # "relative" | "raw"
DEFAULT_TEMPERATURE = 10.0
DEFAULT_RHO = 0.5
DEFAULT_MARGIN_TARGET = 3.0  # the hinge's target smooth-min margin (relative units)
PENALTIES = ("logsumexp", "hinge", "sigmoid")
DEFAULT_PENALTY = "hinge"  # for margin="relative"; margin="raw" uses "logsumexp" (the paper) by default


def _resolve_penalty(penalty: str, margin: MarginKind, margin_target) -> Tuple[str, Optional[float]]:
    if penalty == "auto":
        penalty = DEFAULT_PENALTY if margin == "relative" else "logsumexp"
    if penalty not in PENALTIES:
        raise CRMTError(f"penalty must be 'auto' or one of {PENALTIES}, found {penalty!r}")
    if penalty != "hinge":
        return penalty, None
    number = isinstance(margin_target, (int, float)) and not isinstance(margin_target, bool)
    if not number or not math.isfinite(margin_target):
        raise CRMTError(f"margin_target must be a finite number (the hinge's target margin), found {margin_target!r}")
    return penalty, float(margin_target)


def _stacked_unimodal(out, margin: MarginKind, temperature: float) -> Tensor:
    """(B, M, K) uni-modal logits, scaled as the margin kind asks, in >= float32."""
    try:
        unimodal = out.unimodal
    except AttributeError:
        raise CRMTError(
            f"expected the output of a CRMTWrapper (with .unimodal), found {type(out).__name__}"
        ) from None
    if margin not in ("relative", "raw"):
        raise CRMTError(f"margin must be 'relative' or 'raw', found {margin!r}")
    z = torch.stack(list(unimodal.values()), dim=1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if margin == "raw":
        return z
    if temperature <= 0:
        raise CRMTError(f"temperature must be > 0, found {temperature}")
    norms = torch.stack(
        [torch.linalg.vector_norm(f.to(z.dtype), dim=-1) for f in out.features.values()], dim=1
    )  # (B, M)
    # z * temperature / ||phi||, as one division by (||phi|| / temperature)
    scale = norms.clamp_min(torch.finfo(z.dtype).tiny ** 0.5).div_(temperature)
    return z / scale.unsqueeze(-1)


def _mix_weight(lam: Union[float, Tensor], batch: int, like: Tensor) -> Tensor:
    lam_t = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam_t.dim() == 0:
        lam_t = lam_t.expand(batch)
    if lam_t.shape != (batch,):
        raise CRMTError(f"lam must be a float or a ({batch},) tensor, found shape {tuple(lam_t.shape)}")
    return lam_t


def margin_loss(
    out,
    y: Tensor,
    *,
    y_b: Optional[Tensor] = None,
    lam: Union[float, Tensor, None] = None,
    margin: MarginKind = "relative",
    temperature: float = DEFAULT_TEMPERATURE,
    penalty: str = "auto",
    margin_target: float = DEFAULT_MARGIN_TARGET,
    reduction: str = "mean",
) -> Tensor:
    """The margin regulariser alone, a penalty on the negative uni-modal margins
    d_k^(m) = s^(m) (z_k^(m) - z_y^(m)) over every modality and wrong class:

        "sigmoid":   sum_m sigmoid( log sum_{k != y} exp d_k^(m) )  =  sum_m (1 - softmax(s z^(m))_y)
        "logsumexp": log sum_m sum_{k != y} exp d_k^(m)                 (the paper; margin="raw")
        "hinge":     max(0, logsumexp - log(M (K - 1)) + margin_target)

    With mixup (``y_b`` and ``lam``), the target score is lam z_y + (1 - lam) z_{y_b} and both
    labels are excluded from the sum. A sample with no class left (K = 2 mixing two classes)
    contributes 0.

    Args:
        out: a :class:`~crmt_plugin.CRMTOutput` (``out.unimodal[name]`` (B, K), ``out.features``).
        y: (B,) labels; ``y_b`` (B,) second labels and ``lam`` (float or (B,)) for mixup.
        margin: ``"relative"`` (scale-free, default) or ``"raw"`` (the paper's formula).
        temperature: scale of the relative margins (ignored for ``"raw"``).
        penalty: ``"auto"`` (default: ``"hinge"`` for ``"relative"``, ``"logsumexp"`` for
            ``"raw"``), ``"hinge"``, ``"logsumexp"`` or ``"sigmoid"`` (see the module docs).
        margin_target: the hinge's target smooth-min margin, in scaled units (``"hinge"`` only).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ((B,)).

    Example::

        out = crmt(inputs)
        margin_loss(out, y)                    # scalar
    """
    if (y_b is None) != (lam is None):
        raise CRMTError("mixup needs both y_b and lam (or neither)")
    z = _stacked_unimodal(out, margin, temperature)  # (B, M, K)
    batch, _, num_classes = z.shape
    check_labels(y, batch, num_classes)
    if y_b is not None:
        check_labels(y_b, batch, num_classes, "y_b")
    kind, target = _resolve_penalty(penalty, margin, margin_target)
    return reduce_per_sample(_margin_per_sample(z, y, y_b, lam, kind, target), reduction)


def _margin_per_sample(z: Tensor, y: Tensor, y_b: Optional[Tensor], lam, penalty: str = "logsumexp",
                       target: Optional[float] = None) -> Tensor:
    """(B,) penalty of the scaled differences z_k^(m) - z_target^(m) over the non-label classes (see
    :func:`margin_loss`); labels already checked.

    The label columns are excluded by overwriting them with the dtype's lowest finite value (one
    ``scatter``, no (B, K) mask is built); a finite floor keeps logsumexp's gradient finite.
    """
    batch, num_modalities, num_classes = z.shape
    index = y.view(batch, 1, 1).expand(batch, num_modalities, 1)
    floor = torch.finfo(z.dtype).min
    if y_b is None:
        diff = (z - z.gather(2, index)).scatter(2, index, floor)  # (B, M, K)
    else:
        lam_t = _mix_weight(lam, batch, z).view(batch, 1, 1)
        index_b = y_b.view(batch, 1, 1).expand(batch, num_modalities, 1)
        mixed = lam_t * z.gather(2, index) + (1 - lam_t) * z.gather(2, index_b)
        diff = (z - mixed).scatter(2, index, floor).scatter(2, index_b, floor)
    if penalty == "sigmoid":  # per modality; a modality with no class left gives sigmoid(-huge) = 0
        per_sample = torch.sigmoid(torch.logsumexp(diff, dim=2)).sum(dim=1)
    else:
        per_sample = torch.logsumexp(diff.flatten(1), dim=1)
    if penalty == "hinge":
        # n = number of terms in the sum: M (K - 1), or M (K - 2) for mixup with two labels
        left = num_classes - 1 if y_b is None else num_classes - 1 - (y != y_b).to(z.dtype)
        count = (num_modalities * left).clamp_min(1) if torch.is_tensor(left) else max(num_modalities * left, 1)
        log_count = torch.log(torch.as_tensor(count, dtype=z.dtype, device=z.device))
        per_sample = torch.relu(per_sample - log_count + target)
    # A sample with no class left (K = 1, or K = 2 mixing both classes) contributes 0; for K > 2
    # (K = 2 without mixup) a class is always left, and no check is needed.
    if num_classes == 1:
        per_sample = torch.zeros_like(per_sample)
    elif num_classes == 2 and y_b is not None:
        per_sample = torch.where(y != y_b, torch.zeros_like(per_sample), per_sample)
    return per_sample


def crmt_loss(
    out,
    y: Tensor,
    rho: float = DEFAULT_RHO,
    *,
    y_b: Optional[Tensor] = None,
    lam: Union[float, Tensor, None] = None,
    margin: MarginKind = "relative",
    temperature: float = DEFAULT_TEMPERATURE,
    penalty: str = "auto",
    margin_target: float = DEFAULT_MARGIN_TARGET,
    base_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    reduction: str = "mean",
    return_terms: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """CRMT step-1 loss: ``base_loss(h, y) + rho * margin_loss(out, y)``.

        L1 = CE(h(x), y) + rho * max(0, LSE - log(M (K - 1)) + target)      (default: relative, hinge)
        L1 = CE(h(x), y) + rho * log sum_m sum_{k != y} exp( z_k^(m) - z_y^(m) )   (margin="raw": the paper)

    Mixup: pass ``y_b`` and ``lam``; the base loss becomes lam CE(h, y) + (1 - lam) CE(h, y_b).

    Args:
        out: a :class:`~crmt_plugin.CRMTOutput`; ``out.logits`` (B, K) are the fused logits.
        y: (B,) integer labels.
        rho: weight of the margin term, >= 0 (default 0.5 with the hinge at target 3, chosen on the
            benchmark's six data sets; the paper: 2.0 with ``margin="raw"``).
        margin, temperature, penalty, margin_target: see :func:`margin_loss`.
        base_loss: per-sample or reduced loss on the fused logits, ``f(logits, y)``; default
            cross-entropy. Use it to put CRMT on top of any objective.
        return_terms: also return ``{"base": ..., "margin": ..., "total": ...}`` (detached, for
            logging).

    Returns:
        the loss (scalar for ``reduction="mean"``), or ``(loss, terms)``.

    Example::

        out = crmt(inputs)
        loss = crmt_plugin.crmt_loss(out, y)                                 # the defaults
        loss = crmt_plugin.crmt_loss(out, y, rho=2.0, margin="raw")          # the paper's formula
        loss, terms = crmt_plugin.crmt_loss(out, y, return_terms=True)       # terms["margin"]
    """
    if not isinstance(rho, (int, float)) or rho < 0:
        raise CRMTError(f"rho must be a number >= 0, found {rho!r}")
    if reduction not in ("mean", "sum", "none"):
        raise CRMTError(f"reduction must be 'mean', 'sum' or 'none', found {reduction!r}")
    logits = out.logits
    batch, num_classes = logits.shape[0], logits.shape[-1]
    if batch == 0 and reduction == "mean":
        raise CRMTError(
            "crmt_loss got an empty batch (B = 0): its mean is undefined; skip the batch, or use "
            "reduction='sum' (0, zero gradients) or 'none' ((0,))"
        )
    check_labels(y, batch, num_classes)
    if y_b is not None:
        check_labels(y_b, batch, num_classes, "y_b")
    if (y_b is None) != (lam is None):
        raise CRMTError("mixup needs both y_b and lam (or neither)")
    # The margin term first: it validates `out` and `margin` before any work on the base loss.
    margin_term = None
    if rho != 0:
        z = _stacked_unimodal(out, margin, temperature)
        if z.shape[0] != batch or z.shape[2] != num_classes:
            raise CRMTError(
                f"uni-modal logits have shape {tuple(z.shape[:1]) + tuple(z.shape[2:])} per modality, the "
                f"fused logits {tuple(logits.shape)}"
            )
        kind, target = _resolve_penalty(penalty, margin, margin_target)
        margin_term = reduce_per_sample(_margin_per_sample(z, y, y_b, lam, kind, target), reduction)

    ce_logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def base(labels: Tensor) -> Tensor:
        if base_loss is None:
            return F.cross_entropy(ce_logits, labels, reduction="none")
        value = base_loss(logits, labels)
        return value.expand(batch) if value.dim() == 0 and reduction == "none" else value

    if y_b is None and base_loss is None:
        base_term = F.cross_entropy(ce_logits, y, reduction=reduction)  # reduced in the same op
    else:
        if y_b is None:
            base_term = base(y)
        else:
            base_a, base_b = base(y), base(y_b)
            lam_t = _mix_weight(lam, batch, base_a) if base_a.dim() else torch.as_tensor(lam).mean()
            base_term = lam_t * base_a + (1 - lam_t) * base_b
        base_term = reduce_per_sample(base_term, reduction) if base_term.dim() else base_term
    if margin_term is None:
        margin_term = torch.zeros_like(base_term)
        total = base_term + margin_term
    else:
        total = torch.add(base_term, margin_term, alpha=rho)
    if return_terms:
        return total, {"base": base_term.detach(), "margin": margin_term.detach(), "total": total.detach()}
    return total
