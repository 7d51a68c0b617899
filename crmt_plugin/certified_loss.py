"""Certified (Lipschitz-margin) training losses: cross-entropy on the *worst-case* logits inside the eps-ball.

With sound encoder constants L^(m) the certificate (spec §3) says that a perturbation with joint norm
<= eps moves the fused margin m_k = h_y - h_k by at most eps D_k, where D_k = sqrt(sum_m D_k^(m)^2) and
D_k^(m) is a Lipschitz constant of x^(m) -> h_y - h_k. The worst logits inside the ball are therefore

    h~_k = h_k + eps D_k  (k != y),   h~_y = h_y,      and  CE(h~, y) = log(1 + sum_{k != y} exp(eps D_k - m_k))

(Tsuzuku et al. 2018, GloRo: Leino et al. 2021). Small where every m_k > eps D_k, i.e. where the sample is
certified at eps, so minimising it enlarges the *sound* certified radius.

* :func:`certified_loss` -- the CRMT head (orthonormal rows W~, integration weights a^(m)):
  D_k^(m) = L^(m) ||a_y^(m) W~_y - a_k^(m) W~_k|| = L^(m) sqrt(a_y^2 + a_k^2) (the tight denominator
  ``certify`` uses), plus the CRMT per-modality term: the same worst-case CE on each modality's own
  contribution u^(m) = a^(m) * z^(m) with its own denominator D^(m) at budget ``eps_modality`` (default
  eps / sqrt(M), each modality's share of the joint budget: M shares of eps / sqrt(M) with equal D^(m) imply the
  joint certificate at eps exactly, while eps itself asks every modality alone for more than the joint radius):

      L = CE(h~, y) + rho * mean_m CE(u~^(m), y),   u~_k^(m) = u_k^(m) + eps_m D_k^(m) (k != y)

* :func:`lipschitz_margin_loss` -- a plain linear fusion head h = sum_m W^(m) phi^(m) + b (the fair
  baseline): D_k^(m) = L^(m) ||W_y^(m) - W_k^(m)||, exactly what ``certify`` gives such a model.

Example (a CRMT model whose encoders are 1-Lipschitz)::

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin import CRMTWrapper
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.fusion = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(16, 5)
    ...     def forward(self, a, b):
    ...         return self.fusion(torch.cat([self.a(a), self.b(b)], 1))
    >>> net, plain = Net(), Net()
    >>> crmt = CRMTWrapper(net, head="fusion", modalities={"a": 8, "b": 8})
    >>> x, y = {"a": torch.randn(6, 4), "b": torch.randn(6, 3)}, torch.randint(0, 5, (6,))
    >>> loss = certified_loss(crmt(x), y, crmt=crmt, lipschitz={"a": 1.0, "b": 1.0}, eps=0.5)
    >>> loss.backward()
    >>> base = lipschitz_margin_loss(plain(**x), y, head=plain.fusion, widths={"a": 8, "b": 8},
    ...                              lipschitz={"a": 1.0, "b": 1.0}, eps=0.5)
    >>> bool(base > 0)
    True
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._runtime import check_labels, reduce_per_sample
from .certify import certificate_terms
from .errors import CRMTError
from .head import CRMTHead
from .lipschitz import LipschitzConstants, LipschitzLike, as_lipschitz

__all__ = ["certified_loss", "lipschitz_margin_loss", "worst_case_cross_entropy", "pairwise_denominators"]


def worst_case_cross_entropy(margins: Tensor, denominators: Tensor, y: Tensor, eps: float) -> Tensor:
    """(B,) log(1 + sum_{k != y} exp(eps D_k - m_k)): CE of the worst logits inside the eps-ball.

    ``margins`` (B, K) m_k = h_y - h_k (any value at k = y), ``denominators`` (B, K) D_k >= 0.
    """
    is_label = F.one_hot(y, margins.shape[1]).bool()
    worst = (eps * denominators - margins).float()
    worst = torch.where(is_label, torch.zeros_like(worst), worst)    # the label's own term: exp(0) = 1
    return torch.logsumexp(worst, dim=1)


def _constants(lipschitz: LipschitzLike, modalities) -> LipschitzConstants:
    lip = as_lipschitz(lipschitz).aligned(modalities)
    if lip.per_class:
        raise CRMTError(
            f"certified losses need per-modality encoder constants L^(m) (shape (M,)), found per-class constants of "
            f"shape {tuple(lip.values.shape)}; pass sound encoder bounds, e.g. crmt_plugin.bounds.encoder_bounds(...) "
            "or {name: L}"
        )
    return lip


def _check_eps(eps: float, what: str) -> float:
    value = float(eps)
    if not value >= 0 or value == float("inf"):
        raise CRMTError(f"{what} must be a finite number >= 0, found {eps!r}")
    return value


def certified_loss(
    out,
    y: Tensor,
    *,
    crmt,
    lipschitz: LipschitzLike,
    eps: float,
    rho: float = 0.5,
    eps_modality: Optional[float] = None,
    reduction: str = "mean",
) -> Tensor:
    """Certified CRMT step-1 objective (see the module docstring).

    Args:
        out: the :class:`~crmt_plugin.CRMTOutput` of ``crmt(inputs)`` (``unimodal`` (B, K) per modality).
        y: (B,) labels.
        crmt: the :class:`~crmt_plugin.CRMTWrapper` (or its :class:`~crmt_plugin.CRMTHead`) that produced ``out``.
        lipschitz: sound per-modality encoder constants L^(m): ``{name: L}`` or :class:`LipschitzConstants` (M,),
            e.g. 1 / scale for encoders of :mod:`crmt_plugin.lipschitz_layers`.
        eps: the joint l2 budget to certify (the training radius).
        rho: weight of the per-modality term (0: the joint worst-case CE alone).
        eps_modality: budget of the per-modality term (default ``eps / sqrt(M)``, see the module docstring).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns the loss (scalar, or (B,) for ``"none"``), differentiable in the encoders, W~, a and b.
    """
    head = crmt if isinstance(crmt, CRMTHead) else getattr(crmt, "head", None)
    if not isinstance(head, CRMTHead):
        raise CRMTError(f"crmt must be the CRMTWrapper or CRMTHead that produced `out`, found {type(crmt).__name__}")
    eps = _check_eps(eps, "eps")
    names = head.modalities
    eps_m = eps / math.sqrt(len(names)) if eps_modality is None else _check_eps(eps_modality, "eps_modality")
    lip = _constants(lipschitz, names)
    missing = [n for n in names if n not in out.unimodal]
    if missing:
        raise CRMTError(f"`out` has no uni-modal logits of {missing}: pass the output of crmt(inputs)")
    z = torch.stack([out.unimodal[n] for n in names], dim=1)                      # (B, M, K)
    check_labels(y, z.shape[0], z.shape[2])
    a = head.integration_weights().to(z.dtype)                                   # (M, K)
    weights = [head.unimodal_weight(n) for n in names]
    gram = torch.stack([w @ w.transpose(0, 1) for w in weights]).to(z.dtype)     # (M, K, K), I for orthonormal rows
    margins, per_modality, _ = certificate_terms(z, a, head.bias.to(z.dtype), y, lip,
                                                 denominator="tight", gram=gram)
    joint = per_modality.pow(2).sum(dim=1).clamp_min(torch.finfo(per_modality.dtype).tiny).sqrt()
    loss = worst_case_cross_entropy(margins, joint, y, eps)
    if rho:
        contribution = a.unsqueeze(0) * z                                          # (B, M, K): u^(m) = a^(m) z^(m)
        own = contribution.gather(2, y.view(-1, 1, 1).expand(-1, z.shape[1], 1)) - contribution   # (B, M, K)
        terms = [worst_case_cross_entropy(own[:, i], per_modality[:, i], y, eps_m) for i in range(len(names))]
        loss = loss + float(rho) * torch.stack(terms, dim=1).mean(dim=1)
    return reduce_per_sample(loss, reduction)


def pairwise_denominators(weight: Tensor, widths: Mapping[str, int], lipschitz: LipschitzLike) -> Tensor:
    """D (M, K, K): D[m, y, k] = L^(m) ||W_y^(m) - W_k^(m)|| for a linear fusion head ``weight`` (K, sum_m d_m)."""
    names = tuple(widths)
    lip = _constants(lipschitz, names)
    if weight.dim() != 2 or weight.shape[1] != sum(int(widths[n]) for n in names):
        raise CRMTError(f"weight must be (K, {sum(int(widths[n]) for n in names)}) for widths {dict(widths)}, found "
                        f"{tuple(weight.shape)}")
    blocks = torch.split(weight, [int(widths[n]) for n in names], dim=1)
    out = []
    for block, value in zip(blocks, lip.values.tolist()):
        diff = block.unsqueeze(1) - block.unsqueeze(0)                             # (K, K, d)
        sq = diff.pow(2).sum(dim=2)
        eye = torch.eye(block.shape[0], dtype=torch.bool, device=block.device)
        norm = torch.where(eye, torch.zeros_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())
        out.append(float(value) * norm)
    return torch.stack(out)


def lipschitz_margin_loss(
    logits: Tensor,
    y: Tensor,
    *,
    head: nn.Linear,
    widths: Mapping[str, int],
    lipschitz: LipschitzLike,
    eps: float,
    reduction: str = "mean",
) -> Tensor:
    """GloRo-style certified loss of a plain late-fusion model: CE of the worst logits in the joint eps-ball.

    Args:
        logits: (B, K) ``head(cat_m phi^(m))``.
        head: the fusion ``nn.Linear`` (K, sum_m d_m), the blocks in ``widths`` order.
        widths: {name: d_m} of the concatenated features.
        lipschitz: sound encoder constants L^(m).
        eps: the joint l2 budget.

    D_k = sqrt(sum_m (L^(m) ||W_y^(m) - W_k^(m)||)^2), the joint denominator ``certify`` uses for this model.
    """
    eps = _check_eps(eps, "eps")
    check_labels(y, logits.shape[0], logits.shape[1])
    pair = pairwise_denominators(head.weight, widths, lipschitz)                  # (M, K, K)
    joint = pair.pow(2).sum(dim=0).clamp_min(torch.finfo(pair.dtype).tiny).sqrt()[y]   # (B, K)
    margins = logits.gather(1, y.unsqueeze(1)) - logits
    return reduce_per_sample(worst_case_cross_entropy(margins, joint, y, eps), reduction)
