"""CRMT step 2: tune the integration weights a^(m) to maximise the certified radius.

Encoders, W~ and b are frozen, so the uni-modal logits z^(m)(x_i) never change: they are computed
once (eval mode, no grad) and step 2 runs on that cache:

    maximise  mean_i  r(x_i; a)        over a = softplus(alpha) >= 0 only

where r is the joint certified radius of :mod:`crmt_plugin.certify` (0 for misclassified samples, as
in the paper's L2 = -mean r). The a with the best mean certified radius over the epochs is kept —
step 2 never lowers the mean radius on the data it is given. Under ``torch.distributed`` the objective and
the best-epoch choice are averaged over all ranks' samples (every rank must call it; a rank may hold
fewer samples, or none; ``batch_size`` is per rank), and an error on any rank is raised on all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._runtime import ModeGuard, iterate_batches, move_batch, no_autocast, non_finite_samples
from .certify import radii_from_unimodal, resolve_denominator
from .distributed import all_reduce_max, all_reduce_sum, is_distributed, raise_on_every_rank
from .errors import CRMTError
from .lipschitz import LipschitzLike, as_lipschitz

__all__ = ["fit_integration", "cache_unimodal_logits", "IntegrationResult"]


@dataclass
class IntegrationResult:
    """What step 2 did.

    Attributes:
        mean_radius_before / mean_radius_after: mean certified joint radius on the cached data
            (0 for misclassified samples), before and after.
        accuracy_before / accuracy_after: accuracy on the cached data.
        history: mean certified radius after each epoch.
        best_epoch: the epoch whose a was kept (0 = the initial a, unchanged).
    """

    mean_radius_before: float
    mean_radius_after: float
    accuracy_before: float
    accuracy_after: float
    best_epoch: int
    history: List[float] = field(default_factory=list)


def _cache(crmt, loader: Iterable, prepare_batch, progress: bool) -> Tuple[Tensor, Tensor, int]:
    """z (N, M, K) float64, y (N,) and the number of samples with non-finite z; N may be 0."""
    zs, ys, bads = [], [], []
    device = crmt.head.bias.device
    with ModeGuard(crmt.model, eval_mode=True), torch.no_grad(), no_autocast(device):
        for inputs, y in iterate_batches(loader, prepare_batch, progress=progress, desc="caching logits"):
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


def _non_finite_message(bad: int, total: int) -> str:
    return (f"{bad} of {total} samples have non-finite inputs or uni-modal logits; step 2 refuses to fit "
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


def fit_integration(
    crmt,
    loader: Iterable,
    *,
    lipschitz: LipschitzLike,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    optimizer: Optional[Callable[[Sequence[Tensor]], torch.optim.Optimizer]] = None,
    denominator: str = "auto",
    generator: Optional[torch.Generator] = None,
    prepare_batch=None,
    progress: bool = False,
) -> IntegrationResult:
    """Step 2 on cached uni-modal logits; only a^(m) changes (and stays >= 0).

    Args:
        crmt: the :class:`~crmt_plugin.CRMTWrapper`.
        loader: batches of ``(inputs_dict, y)`` (typically the training set); run through the
            encoders once.
        lipschitz: the constants the radius uses (see :meth:`CRMTWrapper.certify`).
        epochs: passes over the cache (reference: about a third of step 1's epochs).
        lr: learning rate of the default optimizer, Adam on alpha (a = softplus(alpha)).
        batch_size: samples per step on the cache.
        optimizer: ``factory(params) -> torch.optim.Optimizer`` to replace Adam.
        generator: shuffles the cache reproducibly.

    Returns:
        :class:`IntegrationResult` (mean radius before/after, history).

    Example::

        >>> lip = crmt.estimate_lipschitz(train_loader)
        >>> result = crmt.fit_integration(train_loader, lipschitz=lip, epochs=20)
        >>> result.mean_radius_after >= result.mean_radius_before
        True
    """
    with no_autocast(crmt.head.bias.device):  # step 2 in float64 on the model's own logits, never bf16/fp16
        return _fit_integration(crmt, loader, lipschitz, epochs, lr, batch_size, optimizer, denominator,
                                generator, prepare_batch, progress)


def _fit_integration(crmt, loader, lipschitz, epochs, lr, batch_size, optimizer, denominator, generator,
                     prepare_batch, progress) -> IntegrationResult:
    if epochs < 0 or batch_size < 1:
        raise CRMTError(f"epochs must be >= 0 and batch_size >= 1, found epochs={epochs}, batch_size={batch_size}")
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
    failure: Optional[Exception] = None
    try:
        z, y, bad = _cache(crmt, loader, prepare_batch, progress)
    except Exception as exc:  # noqa: BLE001 - under torch.distributed: raised below, on every rank
        if not is_distributed():
            raise
        failure = exc
    raise_on_every_rank(failure, crmt.head.bias.device, "fit_integration")
    counts = all_reduce_sum(torch.tensor([float(z.shape[0]), float(bad)], dtype=torch.float64, device=z.device))
    n_global, bad_global = float(counts[0]), int(counts[1])
    if n_global == 0:
        raise CRMTError("step 2 got an empty loader: it needs at least one sample")
    if bad_global:
        raise CRMTError(_non_finite_message(bad_global, int(n_global)))
    lip64 = type(lip)(lip.values.to(z), lip.modalities, lip.sound, lip.source)
    bias = head.bias.detach().double()
    gram = crmt.gram_matrices().double() if kind == "tight" else None
    original = {n: head.integration[n].detach().clone() for n in crmt.modalities}
    alpha = torch.stack([original[n] for n in crmt.modalities]).double().requires_grad_(True)
    opt = optimizer([alpha]) if optimizer is not None else torch.optim.Adam([alpha], lr=lr)

    def evaluate(alpha_now: Tensor) -> Tuple[float, float]:
        with torch.no_grad():
            radius, _, correct = radii_from_unimodal(z, F.softplus(alpha_now), bias, y, lip64,
                                                     denominator=kind, gram=gram)
            sums = all_reduce_sum(torch.stack([radius.sum(), correct.double().sum()]))
        return float(sums[0]) / n_global, float(sums[1]) / n_global

    best_radius, accuracy_before = evaluate(alpha)
    radius_before, best_epoch, best_alpha, best_accuracy = best_radius, 0, alpha.detach().clone(), accuracy_before
    steps = int(all_reduce_max(torch.tensor(float(-(-z.shape[0] // batch_size)), device=z.device)))
    history: List[float] = []
    for epoch in range(1, epochs + 1):
        chunks = torch.randperm(z.shape[0], generator=generator).to(z.device).split(batch_size)
        for step in range(steps):
            index = chunks[step] if step < len(chunks) else torch.zeros(0, dtype=torch.long, device=z.device)
            radius, _, _ = radii_from_unimodal(z[index], F.softplus(alpha), bias, y[index], lip64,
                                               denominator=kind, gram=gram)
            total = radius.sum()
            grad, = torch.autograd.grad(total, alpha, allow_unused=False) if index.numel() else (torch.zeros_like(alpha),)
            count = all_reduce_sum(torch.tensor(float(index.numel()), dtype=torch.float64, device=z.device))
            grad = all_reduce_sum(grad) / count.clamp_min(1)
            if not bool(torch.isfinite(grad).all()):
                raise CRMTError("non-finite gradient in step 2 (check the Lipschitz constants and the logits)")
            opt.zero_grad(set_to_none=True)
            alpha.grad = -grad  # maximise the mean radius
            opt.step()
        mean_radius, accuracy = evaluate(alpha)
        history.append(mean_radius)
        if mean_radius > best_radius:
            best_radius, best_epoch, best_alpha, best_accuracy = mean_radius, epoch, alpha.detach().clone(), accuracy
    with torch.no_grad():
        for i, name in enumerate(crmt.modalities):
            value = original[name] if best_epoch == 0 else best_alpha[i].to(original[name].dtype)
            head.integration[name].copy_(value)
    return IntegrationResult(
        mean_radius_before=radius_before,
        mean_radius_after=best_radius,
        accuracy_before=accuracy_before,
        accuracy_after=best_accuracy,
        best_epoch=best_epoch,
        history=history,
    )
