"""CRMT step 2: tune the integration weights a^(m) on cached logits, without silently losing accuracy.

Encoders, W~ and b are frozen, so the uni-modal logits z^(m)(x_i) never change: they are computed
once (eval mode, no grad), for the training data and for an optional validation loader, and step 2
runs on those caches:

    maximise  objective(a)   over a = softplus(alpha) >= 0 only,
    keep      the a best on the validation cache (the training cache without one)
    subject to  accuracy(a) >= accuracy(a_0) - accuracy_tolerance   on that same cache.

Objectives (all computed from the caches; "r" is the joint certified radius of
:mod:`crmt_plugin.certify`, 0 for misclassified samples; means over samples):

* ``"mean_radius"`` (default) — the paper's L2 = -mean_i r(x_i; a).
* ``"balanced"`` — the mean of the logs of 2M + 1 mean radii: the joint one, each modality's own
  r^(m) (that modality perturbed alone), and, for each modality m, the joint radius of the model
  with m missing (z^(m) replaced by its fill, see ``missing_fill``). A relative loss in any of them
  costs as much as the same relative loss in any other, so no modality's robustness and no
  missing-modality accuracy is sold for the others.
* ``"mix"`` — ½ log(mean joint radius) + ½ balanced.

Under ``torch.distributed`` the objective, the accuracy and the selection are computed over all
ranks' samples (every rank must call it; a rank may hold fewer samples, or none; ``batch_size`` is
per rank), and an error on any rank is raised on all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._runtime import ModeGuard, iterate_batches, move_batch, no_autocast, non_finite_samples
from .certify import radii_from_unimodal, resolve_denominator
from .distributed import all_reduce_max, all_reduce_sum, is_distributed, raise_on_every_rank
from .errors import CRMTError, warn
from .lipschitz import LipschitzLike, as_lipschitz

__all__ = ["fit_integration", "cache_unimodal_logits", "IntegrationResult", "SplitMetrics", "OBJECTIVES"]

OBJECTIVES = ("mean_radius", "balanced", "mix")
DEFAULT_OBJECTIVE = "mean_radius"
DEFAULT_ACCURACY_TOLERANCE = 0.005
DEFAULT_PATIENCE = 3


@dataclass
class SplitMetrics:
    """What the head does on one cached split, for one a.

    Attributes:
        accuracy: clean accuracy.
        mean_radius: mean joint certified radius (0 for misclassified samples).
        radius_per_modality: {name: mean certified radius with only that modality perturbed}.
        missing_accuracy: {name: accuracy with that modality missing (its fill, see ``missing_fill``)}.
        missing_radius: {name: mean joint certified radius with that modality missing}.
        objective: the step-2 objective's value.
    """

    accuracy: float
    mean_radius: float
    radius_per_modality: Dict[str, float]
    missing_accuracy: Dict[str, float]
    missing_radius: Dict[str, float]
    objective: float


@dataclass
class IntegrationResult:
    """What step 2 did.

    Attributes:
        mean_radius_before / mean_radius_after: mean certified joint radius on the training cache
            (0 for misclassified samples), before and after.
        accuracy_before / accuracy_after: accuracy on the training cache.
        best_epoch: the epoch whose a was kept (0 = the initial a, unchanged).
        history: mean certified radius on the training cache after each epoch.
        objective: the objective optimised.
        selected_on: ``"val"`` (a validation loader was given) or ``"train"``.
        train_before / train_after, val_before / val_after: :class:`SplitMetrics` (accuracy,
            radius, per-modality radii, missing-modality accuracy, objective) before and after;
            ``val_*`` are None without a validation loader.
        objective_history / accuracy_history: objective and accuracy on the selection split after
            each epoch.
        rejected_epochs: epochs whose a was refused because accuracy on the selection split (or,
            with ``protect_missing``, its accuracy with a modality missing) fell by more than
            ``accuracy_tolerance``.
        stopped_early: True when ``patience`` consecutive epochs were refused and step 2 stopped.
        accuracy_tolerance: the tolerance used.
    """

    mean_radius_before: float
    mean_radius_after: float
    accuracy_before: float
    accuracy_after: float
    best_epoch: int
    history: List[float] = field(default_factory=list)
    objective: str = DEFAULT_OBJECTIVE
    selected_on: str = "train"
    train_before: Optional[SplitMetrics] = None
    train_after: Optional[SplitMetrics] = None
    val_before: Optional[SplitMetrics] = None
    val_after: Optional[SplitMetrics] = None
    objective_history: List[float] = field(default_factory=list)
    accuracy_history: List[float] = field(default_factory=list)
    rejected_epochs: List[int] = field(default_factory=list)
    stopped_early: bool = False
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE


def _cache(crmt, loader: Iterable, prepare_batch, progress: bool, desc: str = "caching logits"
           ) -> Tuple[Tensor, Tensor, int]:
    """z (N, M, K) float64, y (N,) and the number of samples with non-finite z; N may be 0."""
    zs, ys, bads = [], [], []
    device = crmt.head.bias.device
    with ModeGuard(crmt.model, eval_mode=True), torch.no_grad(), no_autocast(device):
        for inputs, y in iterate_batches(loader, prepare_batch, progress=progress, desc=desc):
            inputs, y = move_batch(inputs, y, device)
            out = crmt(inputs)
            zs.append(torch.stack([out.unimodal[n] for n in crmt.modalities], dim=1).double())
            ys.append(y)
            bads.append(non_finite_samples(inputs, zs[-1].shape[0], zs[-1].device))
    if zs:
        z, y, bad_inputs = torch.cat(zs), torch.cat(ys), torch.cat(bads)
    else:
        z = torch.zeros(0, len(crmt.modalities), crmt.num_classes, dtype=torch.float64, device=device)
        y = torch.zeros(0, dtype=torch.long, device=device)
        bad_inputs = torch.zeros(0, dtype=torch.bool, device=device)
    bad = int(((~torch.isfinite(z).flatten(1).all(dim=1)) | bad_inputs).sum())
    return z, y, bad


def _non_finite_message(bad: int, total: int, what: str = "") -> str:
    return (f"{bad} of {total} {what}samples have non-finite inputs or uni-modal logits; step 2 refuses to fit "
            "a^(m) on them (check the inputs for NaN/Inf)")


def cache_unimodal_logits(
    crmt, loader: Iterable, *, prepare_batch=None, progress: bool = False
) -> Tuple[Tensor, Tensor]:
    """Run the encoders once in eval mode: z (N, M, K) uni-modal logits and y (N,) labels.

    The model's train/eval mode is restored; nothing in the model changes. Local to this process.
    """
    z, y, bad = _cache(crmt, loader, prepare_batch, progress)
    if z.shape[0] == 0:
        raise CRMTError("step 2 got an empty loader: it needs at least one sample")
    if bad:
        raise CRMTError(_non_finite_message(bad, z.shape[0]))
    return z, y


def _cache_everywhere(crmt, loader, prepare_batch, progress, what: str) -> Tuple[Tensor, Tensor, float]:
    """Cache on every rank; errors raised on all ranks; (z, y, global N)."""
    failure: Optional[Exception] = None
    z = y = None
    bad = 0
    try:
        z, y, bad = _cache(crmt, loader, prepare_batch, progress, desc=f"caching {what} logits")
    except Exception as exc:  # noqa: BLE001 - under torch.distributed: raised below, on every rank
        if not is_distributed():
            raise
        failure = exc
    raise_on_every_rank(failure, crmt.head.bias.device, "fit_integration")
    counts = all_reduce_sum(torch.tensor([float(z.shape[0]), float(bad)], dtype=torch.float64, device=z.device))
    n_global, bad_global = float(counts[0]), int(counts[1])
    if n_global == 0:
        name = "loader" if what == "train" else "val_loader"
        raise CRMTError(f"step 2 got an empty {name}: it needs at least one sample")
    if bad_global:
        raise CRMTError(_non_finite_message(bad_global, int(n_global), "" if what == "train" else "validation "))
    return z, y, n_global


def _missing_fill_logits(crmt, missing_fill, z: Tensor, n_global: float) -> Tensor:
    """(M, K): the uni-modal logits that stand for each modality when it is missing."""
    if missing_fill is None:  # the modality's mean logits over the (global) training cache
        return all_reduce_sum(z.sum(dim=0)) / n_global
    with torch.no_grad(), no_autocast(crmt.head.bias.device):
        fill = crmt.fill_unimodal_logits(missing_fill).double()
    if not bool(torch.isfinite(fill).all()):
        raise CRMTError("missing_fill gives non-finite uni-modal logits; check the fill inputs for NaN/Inf")
    return fill


class _Split:
    """One cached split and everything computed on it for a given a (local sums, reduced globally)."""

    def __init__(self, z: Tensor, y: Tensor, n_global: float, fill: Tensor, radii: Callable) -> None:
        self.z, self.y, self.n = z, y, n_global
        self.fill = fill
        self.radii = radii

    def components(self, a: Tensor, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Local sums (2M + 1,) of [joint radius, r^(m) (M), missing-m joint radius (M)], the local
        count of correct samples and (M,) local counts correct with each modality missing."""
        z, y = (self.z, self.y) if index is None else (self.z[index], self.y[index])
        num_modalities = z.shape[1]
        radius, per_modality, correct = self.radii(z, a, y)
        sums = [radius.sum().unsqueeze(0), per_modality.sum(dim=0)]
        missing_correct = []
        for m in range(num_modalities):
            z_missing = z.clone()
            z_missing[:, m] = self.fill[m]
            r_missing, _, c_missing = self.radii(z_missing, a, y)
            sums.append(r_missing.sum().unsqueeze(0))
            missing_correct.append(c_missing.double().sum())
        missing = torch.stack(missing_correct) if missing_correct else torch.zeros(0, dtype=z.dtype, device=z.device)
        return torch.cat(sums), correct.double().sum(), missing


def _objective_fn(objective) -> Callable[[Tensor, Tensor], Tensor]:
    """f(R (2M+1,) global mean components, delta (2M+1,)) -> scalar to maximise."""
    if callable(objective):
        return lambda r, delta: objective({"joint": r[0], "modality": r[1:1 + (r.numel() - 1) // 2],
                                           "missing": r[1 + (r.numel() - 1) // 2:]})
    if objective == "mean_radius":
        return lambda r, delta: r[0]
    if objective == "balanced":
        return lambda r, delta: (r + delta).log().mean()
    if objective == "mix":
        return lambda r, delta: 0.5 * (r[0] + delta[0]).log() + 0.5 * (r + delta).log().mean()
    raise CRMTError(f"objective must be one of {OBJECTIVES} or a callable, found {objective!r}")


def fit_integration(
    crmt,
    loader: Iterable,
    *,
    lipschitz: LipschitzLike,
    val_loader: Optional[Iterable] = None,
    objective: Union[str, Callable[[Dict[str, Tensor]], Tensor]] = DEFAULT_OBJECTIVE,
    accuracy_tolerance: float = DEFAULT_ACCURACY_TOLERANCE,
    protect_missing: bool = True,
    patience: Optional[int] = DEFAULT_PATIENCE,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    optimizer: Optional[Callable[[Sequence[Tensor]], torch.optim.Optimizer]] = None,
    denominator: str = "auto",
    missing_fill: Optional[Mapping[str, Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    prepare_batch=None,
    progress: bool = False,
) -> IntegrationResult:
    """Step 2 on cached uni-modal logits; only a^(m) changes (and stays >= 0).

    a is optimised on ``loader``'s cache; after every epoch it is scored on ``val_loader``'s cache
    (on ``loader``'s without one), and the a kept is the one with the best objective there among
    those whose clean accuracy there is at least the initial accuracy minus ``accuracy_tolerance``
    (the initial a always qualifies, so step 2 never lowers that accuracy by more than the
    tolerance), and, with ``protect_missing``, whose accuracy with each modality missing is kept the
    same way. Refused epochs are reported through a ``UserWarning`` at the caller's line; after ``patience``
    consecutive refusals step 2 stops early (and says so).

    Args:
        crmt: the :class:`~crmt_plugin.CRMTWrapper`.
        loader: batches of ``(inputs_dict, y)`` to fit a on (typically the training set); run
            through the encoders once.
        lipschitz: the constants the radius uses (see :meth:`CRMTWrapper.certify`).
        val_loader: batches for model selection (the validation split); cached once too.
        objective: ``"mean_radius"`` (default; the paper's), ``"balanced"`` (mean log of the joint,
            every per-modality and every missing-modality mean radius), ``"mix"``, or a callable
            ``f({"joint": (), "modality": (M,), "missing": (M,)}) -> scalar`` of the mean radii.
        accuracy_tolerance: largest accepted fall in clean accuracy on the selection split, as a
            fraction (0.005 = half a point); ``math.inf`` turns the constraint off.
        protect_missing: apply the same tolerance to the accuracy with each modality missing
            (default True; see ``missing_fill``).
        patience: consecutive refused epochs before stopping; ``None`` never stops early.
        epochs: passes over the cache (reference: about a third of step 1's epochs).
        lr: learning rate of the default optimizer, Adam on alpha (a = softplus(alpha)).
        batch_size: samples per step on the cache.
        optimizer: ``factory(params) -> torch.optim.Optimizer`` to replace Adam.
        missing_fill: ``{name: one sample's input}`` standing for a missing modality (e.g.
            ``crmt_plugin.attacks.modality_means(train_loader)``; one forward). Default: the
            modality's mean uni-modal logits over ``loader`` (the same for linear encoders).
        generator: shuffles the cache reproducibly.

    Returns:
        :class:`IntegrationResult` (accuracy, radii, per-modality radii and missing-modality
        accuracy before/after on both splits, history, refused epochs, early stop).

    Example::

        lip = crmt.estimate_lipschitz(train_loader)
        result = crmt.fit_integration(train_loader, lipschitz=lip, val_loader=val_loader)
        result.val_after.accuracy >= result.val_before.accuracy - 0.005    # True
    """
    with no_autocast(crmt.head.bias.device):  # step 2 in float64 on the model's own logits, never bf16/fp16
        return _fit_integration(crmt, loader, lipschitz, val_loader, objective, accuracy_tolerance,
                                protect_missing, patience,
                                epochs, lr, batch_size, optimizer, denominator, missing_fill, generator,
                                prepare_batch, progress)


def _fit_integration(crmt, loader, lipschitz, val_loader, objective, tolerance, protect_missing, patience, epochs,
                     lr, batch_size,
                     optimizer, denominator, missing_fill, generator, prepare_batch, progress) -> IntegrationResult:
    if epochs < 0 or batch_size < 1:
        raise CRMTError(f"epochs must be >= 0 and batch_size >= 1, found epochs={epochs}, batch_size={batch_size}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise CRMTError(f"accuracy_tolerance must be a fraction >= 0 (0.005 = half a point), found {tolerance!r}")
    if tolerance >= 1 and math.isfinite(tolerance):
        raise CRMTError(f"accuracy_tolerance is a fraction of the samples (0.005 = half a point), found "
                        f"{tolerance!r}; pass math.inf to turn the accuracy constraint off")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise CRMTError(f"patience must be a positive int or None, found {patience!r}")
    f_objective = _objective_fn(objective)
    objective_name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    head = crmt.head
    lip = as_lipschitz(lipschitz).aligned(crmt.modalities)
    kind = resolve_denominator(denominator, lip)
    with torch.no_grad():
        a_now = head.integration_weights()
    if not (bool(torch.isfinite(a_now).all()) and bool(torch.isfinite(head.bias).all())):
        raise CRMTError(
            f"the CRMT head has non-finite integration weights a {a_now.tolist()} or bias "
            f"{head.bias.tolist()}: step 2 cannot start from them (training diverged?)"
        )
    # Every rank reaches the same collectives, whatever it holds (no sample, a failure, NaN logits):
    # an error is raised on all ranks instead of leaving the others waiting.
    z, y, n_global = _cache_everywhere(crmt, loader, prepare_batch, progress, "train")
    val = None
    if val_loader is not None:
        val = _cache_everywhere(crmt, val_loader, prepare_batch, progress, "val")
    fill = _missing_fill_logits(crmt, missing_fill, z, n_global)
    lip64 = type(lip)(lip.values.to(z), lip.modalities, lip.sound, lip.source)
    bias = head.bias.detach().double()
    gram = crmt.gram_matrices().double() if kind == "tight" else None

    def radii(z_: Tensor, a: Tensor, y_: Tensor):
        return radii_from_unimodal(z_, a, bias, y_, lip64, denominator=kind, gram=gram)

    train = _Split(z, y, n_global, fill, radii)
    splits = {"train": train}
    if val is not None:
        splits["val"] = _Split(val[0], val[1], val[2], fill, radii)
    selected_on = "val" if val is not None else "train"
    original = {n: head.integration[n].detach().clone() for n in crmt.modalities}
    alpha = torch.stack([original[n] for n in crmt.modalities]).double().requires_grad_(True)
    shared = head.shared_scale_factor().detach().double()  # a = shared * softplus(alpha); tau stays

    def weights_of(alpha_now: Tensor) -> Tensor:
        return shared * F.softplus(alpha_now)
    opt = optimizer([alpha]) if optimizer is not None else torch.optim.Adam([alpha], lr=lr)
    names = crmt.modalities

    def measure(alpha_now: Tensor) -> Dict[str, Tuple[Tensor, float, Tensor]]:
        """Global (mean components, accuracy, missing accuracy) per split."""
        result = {}
        with torch.no_grad():
            a = weights_of(alpha_now)
            for key, split in splits.items():
                sums, correct, missing = split.components(a)
                reduced = all_reduce_sum(torch.cat([sums, correct.unsqueeze(0), missing])) / split.n
                m = len(names)
                result[key] = (reduced[: 2 * m + 1], float(reduced[2 * m + 1]), reduced[2 * m + 2:])
        return result

    def metrics(measured, delta) -> Dict[str, SplitMetrics]:
        out = {}
        for key, (r, acc, missing) in measured.items():
            out[key] = SplitMetrics(
                accuracy=acc,
                mean_radius=float(r[0]),
                radius_per_modality={n: float(r[1 + i]) for i, n in enumerate(names)},
                missing_accuracy={n: float(missing[i]) for i, n in enumerate(names)},
                missing_radius={n: float(r[1 + len(names) + i]) for i, n in enumerate(names)},
                objective=float(f_objective(r, delta)),
            )
        return out

    start = measure(alpha)
    # log objectives: a floor relative to the initial radii, so a component at 0 stays finite
    r0 = start["train"][0]
    delta = torch.full_like(r0, 1e-3 * max(float(r0.max()), 1e-12))
    before = metrics(start, delta)
    sel_before = before[selected_on]
    floor = sel_before.accuracy - tolerance
    missing_floor = {n: v - tolerance for n, v in sel_before.missing_accuracy.items()}

    def refused(m: SplitMetrics) -> bool:
        if m.accuracy < floor - 1e-12:
            return True
        return protect_missing and any(m.missing_accuracy[n] < missing_floor[n] - 1e-12 for n in names)

    best_value, best_epoch, best_alpha, best_metrics = sel_before.objective, 0, alpha.detach().clone(), before
    steps = int(all_reduce_max(torch.tensor(float(-(-z.shape[0] // batch_size)), device=z.device)))
    history: List[float] = []
    objective_history: List[float] = []
    accuracy_history: List[float] = []
    rejected: List[int] = []
    consecutive = 0
    stopped_early = False
    for epoch in range(1, epochs + 1):
        chunks = torch.randperm(z.shape[0], generator=generator).to(z.device).split(batch_size)
        for step in range(steps):
            index = chunks[step] if step < len(chunks) else torch.zeros(0, dtype=torch.long, device=z.device)
            sums, _, _ = train.components(weights_of(alpha), index)
            count = all_reduce_sum(torch.tensor(float(index.numel()), dtype=torch.float64, device=z.device))
            means = all_reduce_sum(sums.detach()) / count.clamp_min(1)
            # d f / d (mean components) at the global batch means, then one local backward of
            # sum_j w_j * local_sum_j / global_count: the exact gradient of f(global batch means)
            means_leaf = means.clone().requires_grad_(True)
            weights, = torch.autograd.grad(f_objective(means_leaf, delta), means_leaf, allow_unused=True)
            weights = torch.zeros_like(means) if weights is None else weights
            if index.numel():
                surrogate = (weights * sums).sum() / count.clamp_min(1)
                grad, = torch.autograd.grad(surrogate, alpha, allow_unused=True)
                grad = torch.zeros_like(alpha) if grad is None else grad
            else:
                grad = torch.zeros_like(alpha)
            grad = all_reduce_sum(grad)
            if not bool(torch.isfinite(grad).all()):
                raise CRMTError("non-finite gradient in step 2 (check the Lipschitz constants and the logits)")
            opt.zero_grad(set_to_none=True)
            alpha.grad = -grad  # maximise the objective
            opt.step()
        measured = metrics(measure(alpha), delta)
        history.append(measured["train"].mean_radius)
        sel = measured[selected_on]
        objective_history.append(sel.objective)
        accuracy_history.append(sel.accuracy)
        if refused(sel):
            rejected.append(epoch)
            consecutive += 1
            if patience is not None and consecutive >= patience and epoch < epochs:
                stopped_early = True
                break
            continue
        consecutive = 0
        if sel.objective > best_value:
            best_value, best_epoch, best_alpha, best_metrics = sel.objective, epoch, alpha.detach().clone(), measured
    with torch.no_grad():
        for i, name in enumerate(crmt.modalities):
            value = original[name] if best_epoch == 0 else best_alpha[i].to(original[name].dtype)
            head.integration[name].copy_(value)
    if rejected:
        where = "validation" if selected_on == "val" else "training"
        ran = rejected[-1] if stopped_early else epochs
        warn(
            f"fit_integration: {len(rejected)} of {ran} epochs refused because clean accuracy on the {where} "
            + ("data (or its accuracy with a modality missing) " if protect_missing else "data ")
            + f"would fall by more than accuracy_tolerance={tolerance:g} (from {sel_before.accuracy:.4f}; "
            f"epochs {rejected})"
            + (f"; stopped early after {patience} consecutive refusals at epoch {ran}" if stopped_early else "")
            + f"; kept the a of epoch {best_epoch}" + (" (the initial a, unchanged)" if best_epoch == 0 else ""),
        )
    return IntegrationResult(
        mean_radius_before=before["train"].mean_radius,
        mean_radius_after=best_metrics["train"].mean_radius,
        accuracy_before=before["train"].accuracy,
        accuracy_after=best_metrics["train"].accuracy,
        best_epoch=best_epoch,
        history=history,
        objective=objective_name,
        selected_on=selected_on,
        train_before=before["train"],
        train_after=best_metrics["train"],
        val_before=before.get("val"),
        val_after=best_metrics.get("val"),
        objective_history=objective_history,
        accuracy_history=accuracy_history,
        rejected_epochs=rejected,
        stopped_early=stopped_early,
        accuracy_tolerance=float(tolerance),
    )
