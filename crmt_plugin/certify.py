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

Per-modality budgets (several modalities perturbed at once, each within its own budget eps_m):
the prediction provably stays while, for every k != y,

        m_k > sum_m D_k^(m) eps_m                                   (Certificate.certified(eps))

The certified set of budgets is a polytope. Its intercept on the eps_m axis is the per-modality
radius r^(m). By Cauchy-Schwarz (sum_m D_k^(m) eps_m <= ||D_k|| ||eps||) it contains every budget
vector with sqrt(sum_m eps_m^2) < r, the joint radius, and it is usually much larger than that ball.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from einops import rearrange
from torch import Tensor

from ._optional import require
from .errors import CRMTError
from .lipschitz import LipschitzConstants

__all__ = ["Certificate", "radii_from_unimodal", "certificate_terms", "radii_from_margins", "stored_margins"]

Budget = Union[float, Tensor]


@dataclass
class Certificate:
    """Certified radii of a batch.

    Attributes:
        radius: (B,) joint l2 radius; no perturbation of all modalities with
            sqrt(sum_m ||eps^(m)||^2) < radius changes the prediction. 0 where misclassified.
        radius_per_modality: {name: (B,)} radius when only that modality is perturbed.
        correct: (B,) bool, the sample is classified as its label (strict margin).
        sound: True only when the Lipschitz constants are guaranteed upper bounds **and** the
            late-fusion structure of the model was verified (see :mod:`crmt_plugin.structure`).
        denominator: ``"paper"`` or ``"tight"`` (see module docs).
        source: where the Lipschitz constants came from.
        margins: (B, K) float64 fused margins m_k = h_y - h_k (+inf at k = y), or None.
        denominators: (B, M, K) float64 per-modality Lipschitz denominators D_k^(m), or None.
            Together they give :meth:`certified` for per-modality budgets.

    Example::

        cert = crmt.certify(inputs, y, lipschitz=lip)
        cert.certified_accuracy([0.0, 0.5, 1.0])         # fraction with radius >= r
        cert.certified({"audio": 0.3, "image": 0.1})     # (B,) bool, both perturbed at once

    A certificate built by hand (the numbers of a 2-class, 2-modality sample)::

        >>> import torch
        >>> cert = Certificate(radius=torch.tensor([0.5]), radius_per_modality={"a": torch.tensor([1.0]),
        ...     "b": torch.tensor([2.0])}, correct=torch.tensor([True]), sound=True, denominator="tight",
        ...     source="declared", margins=torch.tensor([[float("inf"), 2.0]]),
        ...     denominators=torch.tensor([[[1.0, 2.0], [1.0, 1.0]]]))
        >>> cert.certified({"a": 0.9}), cert.certified({"a": 0.5, "b": 0.9}), cert.certified({"a": 0.5, "b": 1.1})
        (tensor([True]), tensor([True]), tensor([False]))
    """

    radius: Tensor
    radius_per_modality: Dict[str, Tensor]
    correct: Tensor
    sound: bool
    denominator: str
    source: str
    margins: Optional[Tensor] = None
    denominators: Optional[Tensor] = None

    @property
    def modalities(self) -> Tuple[str, ...]:
        """Modality names, in the order of ``denominators``' second axis."""
        return tuple(self.radius_per_modality)

    def certified_accuracy(self, radii: Sequence[float], modality: Optional[str] = None) -> Tensor:
        """Fraction of samples classified correctly with (joint or one modality's) radius >= each r:
        (len(radii),). Misclassified samples are never certified, not even at r = 0."""
        radius = self.radius if modality is None else self.radius_per_modality[modality]
        thresholds = torch.as_tensor(list(radii), dtype=radius.dtype, device=radius.device)
        if radius.numel() == 0:
            return torch.zeros_like(thresholds)
        certified = (radius.unsqueeze(0) >= thresholds.unsqueeze(1)) & self.correct.unsqueeze(0)
        return certified.to(radius.dtype).mean(dim=1)

    # ------------------------------------------------------------------ per-modality budgets
    def _terms(self) -> Tuple[Tensor, Tensor]:
        if self.margins is None or self.denominators is None:
            raise CRMTError(
                "this certificate keeps no margins and per-modality denominators (it was built without "
                "them); per-modality budgets need a certificate from CRMTWrapper.certify"
            )
        return self.margins, self.denominators

    def _budgets(self, eps: Mapping[str, Budget], margins: Tensor) -> Tensor:
        if not isinstance(eps, Mapping):
            raise CRMTError(f"eps must map modality name -> budget, found {type(eps).__name__}; for one joint "
                            "budget use cert.radius")
        names = self.modalities
        unknown = sorted(set(eps) - set(names))
        if unknown:
            raise CRMTError(f"eps names the modalities {unknown}, the certificate has {list(names)}")
        batch = margins.shape[0]
        columns = []
        for n in names:
            value = eps.get(n, 0.0)
            budget = torch.as_tensor(value, dtype=margins.dtype, device=margins.device)
            if budget.dim() > 1 or (budget.dim() == 1 and budget.shape[0] != batch):
                raise CRMTError(f"eps[{n!r}] must be a number or a tensor ({batch},), found shape "
                                f"{tuple(budget.shape)}")
            if not bool(torch.isfinite(budget).all()) or bool((budget < 0).any()):
                raise CRMTError(f"eps[{n!r}] must be finite and >= 0, found {value!r}")
            columns.append(budget.expand(batch))
        return torch.stack(columns, dim=1) if columns else margins.new_zeros(batch, 0)  # (B, M)

    def certified(self, eps: Mapping[str, Budget]) -> Tensor:
        """(B,) bool: the prediction provably stays under *every* perturbation with
        ||eps^(m)|| <= eps[m] for all modalities m at once.

            certified  <=>  correct  and  m_k > sum_m D_k^(m) eps[m]   for every k != y

        Args:
            eps: {name: budget}, each a number or a (B,) tensor; a modality left out has budget 0
                (it is not perturbed). Unknown names raise.

        With one non-zero budget this is ``eps[m] < radius_per_modality[m]``; every budget vector
        with sqrt(sum_m eps[m]^2) < ``radius`` is certified (the joint ball lies inside the region).
        """
        margins, denominators = self._terms()
        budgets = self._budgets(eps, margins)
        need = torch.einsum("bmk,bm->bk", denominators, budgets)
        return self.correct & (margins > need).all(dim=1)

    def frontier(
        self, index: int, modalities: Tuple[str, str], *, steps: int = 101,
        others: Optional[Mapping[str, float]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The edge of sample ``index``'s certified region in the plane of two modalities' budgets.

        Returns ``(eps_x (steps,), eps_y (steps,))``: for each budget eps_x of ``modalities[0]`` from 0
        to its largest certified value, the supremum eps_y of certified budgets of ``modalities[1]``
        (the region is ``eps_y < frontier``). ``others`` fixes the budgets of the other modalities
        (default 0). Empty tensors for a sample that is not certified at all.
        """
        margins, denominators = self._terms()
        x_name, y_name = modalities
        names = self.modalities
        if x_name not in names or y_name not in names or x_name == y_name:
            raise CRMTError(f"frontier needs two different modalities of {list(names)}, found {modalities!r}")
        fixed = dict(others or {})
        if x_name in fixed or y_name in fixed:
            raise CRMTError("`others` must not fix the budgets of the two plotted modalities")
        m = margins[index]
        d = denominators[index]  # (M, K)
        budgets = self._budgets(fixed, margins)[index]  # (M,)
        slack = m - (d * budgets[:, None]).sum(dim=0)  # (K,), +inf at k = y
        ix, iy = names.index(x_name), names.index(y_name)
        dx, dy = d[ix], d[iy]
        if not bool(self.correct[index]) or not bool((slack > 0).all()):
            empty = margins.new_zeros(0)
            return empty, empty
        finite = torch.isfinite(slack)
        x_max = torch.where(finite & (dx > 0), slack / dx, torch.full_like(slack, float("inf"))).amin()
        if not bool(torch.isfinite(x_max)):
            x_max = torch.where(finite & (dy > 0), slack / dy, torch.full_like(slack, float("inf"))).amin()
            x_max = x_max if bool(torch.isfinite(x_max)) else torch.ones_like(x_max)
        eps_x = torch.linspace(0, float(x_max), steps, dtype=margins.dtype, device=margins.device)
        rest = slack[None, :] - eps_x[:, None] * dx[None, :]  # (steps, K)
        bound = torch.where(dy > 0, rest / dy, torch.where(rest > 0, float("inf"), 0.0))
        bound = torch.where(finite[None, :], bound, torch.full_like(bound, float("inf")))
        return eps_x, bound.amin(dim=1).clamp_min(0)

    def plot_region(
        self, index: int, modalities: Tuple[str, str], *, ax: Any = None, steps: int = 101,
        others: Optional[Mapping[str, float]] = None,
    ) -> Any:
        """Plot sample ``index``'s certified region of two modalities' budgets (matplotlib).

        Draws the frontier of :meth:`frontier` (the region below it is certified), the joint ball
        sqrt(eps_x^2 + eps_y^2) < radius (drawn only when ``others`` is empty) and the per-modality
        radii on the axes. Returns the matplotlib ``Axes``.
        """
        plt = require("matplotlib.pyplot", "Certificate.plot_region")
        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        x_name, y_name = modalities
        eps_x, eps_y = self.frontier(index, modalities, steps=steps, others=others)
        if eps_x.numel():
            xs, ys = eps_x.cpu().numpy(), eps_y.cpu().numpy()
            ax.fill_between(xs, 0, ys, alpha=0.25, label="certified budgets")
            ax.plot(xs, ys, label="frontier")
            r = float(self.radius[index])
            if not others and r < float("inf"):
                t = torch.linspace(0, torch.pi / 2, 50)
                ax.plot((r * t.cos()).numpy(), (r * t.sin()).numpy(), "--", label=f"joint radius {r:.3g}")
            ax.plot([float(self.radius_per_modality[x_name][index])], [0], "o",
                    label=f"radius of {x_name}")
            ax.plot([0], [float(self.radius_per_modality[y_name][index])], "s",
                    label=f"radius of {y_name}")
        ax.set_xlabel(f"budget of {x_name} (l2)")
        ax.set_ylabel(f"budget of {y_name} (l2)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize="small")
        return ax


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


def certificate_terms(
    z: Tensor,
    a: Tensor,
    bias: Tensor,
    y: Tensor,
    lipschitz: LipschitzConstants,
    *,
    denominator: str = "auto",
    gram: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The pieces of every certificate: margins (B, K) m_k = h_y - h_k (0 at k = y), the
    per-modality denominators D (B, M, K) (unclamped, >= 0) and correct (B,) bool.

    Same arguments as :func:`radii_from_unimodal`; differentiable in ``a``.
    """
    kind = resolve_denominator(denominator, lipschitz)
    fused = torch.einsum("bmk,mk->bk", z, a) + bias
    is_label = torch.nn.functional.one_hot(y, z.shape[2]).bool()
    margins = fused.gather(1, y.unsqueeze(1)) - fused  # (B, K)
    correct = (margins > 0).logical_or(is_label).all(dim=1)
    return margins, _denominators(y, a, lipschitz, kind, gram), correct


def radii_from_margins(margins: Tensor, denominators: Tensor, correct: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Joint (B,) and per-modality (B, M) radii from :func:`certificate_terms`' pieces (0 where wrong);
    differentiable (k = y is masked out with ``where``, so no inf enters the graph)."""
    is_label = torch.nn.functional.one_hot(y, margins.shape[1]).bool()
    denom = denominators.clamp_min(torch.finfo(denominators.dtype).tiny)
    inf = torch.tensor(float("inf"), dtype=margins.dtype, device=margins.device)
    joint = torch.where(is_label, inf, margins / denom.pow(2).sum(dim=1).sqrt()).amin(dim=1)
    per_modality = torch.where(is_label.unsqueeze(1), inf, margins.unsqueeze(1) / denom).amin(dim=2)
    joint = torch.where(correct, joint, torch.zeros_like(joint))
    per_modality = torch.where(correct.unsqueeze(1), per_modality, torch.zeros_like(per_modality))
    return joint, per_modality


def stored_margins(margins: Tensor, y: Tensor) -> Tensor:
    """The margins a :class:`Certificate` keeps: detached, +inf at k = y (never binding)."""
    is_label = torch.nn.functional.one_hot(y, margins.shape[1]).bool()
    return torch.where(is_label, torch.full_like(margins, float("inf")), margins.detach())


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
    margins, denominators, correct = certificate_terms(z, a, bias, y, lipschitz, denominator=denominator, gram=gram)
    joint, per_modality = radii_from_margins(margins, denominators, correct, y)
    return joint, per_modality, correct
