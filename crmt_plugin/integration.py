"""CRMT step 2: tune the integration weights a^(m) to maximise the certified radius.

Encoders, W~ and b are frozen, so the uni-modal logits z^(m)(x_i) never change: they are computed
once (eval mode, no grad) and step 2 runs on that cache:

    maximise  mean_i  r(x_i; a)        over a = softplus(alpha) >= 0 only

where r is the joint certified radius of :mod:`crmt_plugin.certify` (0 for misclassified samples, as
in the paper's L2 = -mean r). The a with the best mean certified radius over the epochs is kept —
step 2 never lowers the mean radius on the data it is given. Under ``torch.distributed`` the objective and
the best-epoch choice are averaged over all ranks' samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .certify import radii_from_unimodal, resolve_denominator
from .distributed import all_reduce_max, all_reduce_sum
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


def cache_unimodal_logits(
    crmt, loader: Iterable, *, prepare_batch=None, progress: bool = False
) -> Tuple[Tensor, Tensor]:
    """Run the encoders once in eval mode: z (N, M, K) uni-modal logits and y (N,) labels.

    The model's train/eval mode is restored; nothing in the model changes.
    """
    from .wrapper import iterate_batches

    zs, ys = [], []
    was_training = crmt.model.training
    crmt.model.eval()
    try:
        with torch.no_grad():
            for inputs, y in iterate_batches(loader, prepare_batch, progress, "caching logits"):
                inputs, y = crmt._to_device(inputs, y)
                out = crmt(inputs)
                zs.append(torch.stack([out.unimodal[n] for n in crmt.modalities], dim=1).double())
                ys.append(y)
    finally:
        crmt.model.train(was_training)
    if not zs:
        raise CRMTError("step 2 got an empty loader: it needs at least one batch")
    z, y = torch.cat(zs), torch.cat(ys)
    bad = ~torch.isfinite(z).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise CRMTError(
            f"{int(bad.sum())} of {z.shape[0]} samples have non-finite uni-modal logits; step 2 refuses "
            "to fit a^(m) on them (check the inputs for NaN/Inf)"
        )
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
    if epochs < 0 or batch_size < 1:
        raise CRMTError(f"epochs must be >= 0 and batch_size >= 1, found epochs={epochs}, batch_size={batch_size}")
    head = crmt.head
    lip = as_lipschitz(lipschitz).aligned(crmt.modalities)
    kind = resolve_denominator(denominator, lip)
    z, y = cache_unimodal_logits(crmt, loader, prepare_batch=prepare_batch, progress=progress)
    lip64 = type(lip)(lip.values.to(z), lip.modalities, lip.sound, lip.source)
    bias = head.bias.detach().double()
    gram = crmt.gram_matrices().double() if kind == "tight" else None
    original = {n: head.integration[n].detach().clone() for n in crmt.modalities}
    alpha = torch.stack([original[n] for n in crmt.modalities]).double().requires_grad_(True)
    opt = optimizer([alpha]) if optimizer is not None else torch.optim.Adam([alpha], lr=lr)

    n_local = torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device)
    n_global = float(all_reduce_sum(n_local))

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
            index = chunks[step] if step < len(chunks) else chunks[0][:0]
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
