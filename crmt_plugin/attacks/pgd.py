"""Gradient attacks: :class:`PGD` (constant or APGD step-size schedule, restarts, targeted runs) and
:class:`FGM` (one full step), siblings on :class:`~crmt_plugin.attacks.base.Attack`."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union  # noqa: F401

import torch
from torch import Tensor

from ..errors import CRMTError
from .balls import bcast
from .base import Attack, AttackBatch, Best, BoundValue, Budget, ModelCall, check_budget
from .losses import LossFn, resolve_loss

__all__ = ["PGD", "FGM"]

_SCHEDULES = ("constant", "apgd")


def _where(mask: Tensor, a: Dict[str, Tensor], b: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {n: torch.where(bcast(mask, a[n]).bool(), a[n], b[n]) for n in a}


class PGD(Attack):
    """Projected gradient ascent on any subset of modalities, l2 or linf, joint or per-modality budgets.

    Example::

        attack = PGD(eps=1.0, norm="l2", modalities=["audio"], steps=10, restarts=2,
                     bounds={"audio": (-3.0, 3.0)}, generator=torch.Generator().manual_seed(0))
        adv = attack(model, inputs, y)   # inputs: {"audio": (B, 13, 32), "image": (B, 1, 28, 28)}, y: (B,)
        adv["image"] is inputs["image"]  # True: untouched modalities are the very same tensors

    >>> PGD(eps={"audio": 0.5, "image": 2.0}, steps=50, schedule="apgd", loss="dlr").label
    'APGD-dlr-l2'

    Args (besides those of :class:`~crmt_plugin.attacks.base.Attack`: eps, norm, modalities, bounds,
    generator, eval_mode, call):
        steps: gradient steps per run.
        step_size: the constant schedule's step: ``None`` (``2.5 * eps / steps`` for each budget), a
            number (absolute, for every budget) or a mapping name -> step (per-modality budgets
            only). With ``schedule="apgd"`` the *initial* step (default ``2 * eps``).
        random_start: start at a random point of the budget (l2: a uniformly random direction, a
            radius uniform in [0, eps]; linf: uniform in the box).
        restarts: independent runs (per target class for targeted runs); per sample the worst case
            is kept: a misclassifying run beats a non-misclassifying one, ties go to the higher loss
            (targeted runs: to the higher CW margin ``max_{k != y} z_k - z_y``).
        loss: ``callable(logits, y) -> (B,)`` maximised by the attack, or a name: ``"ce"`` (default),
            ``"dlr"`` (scale-invariant, Croce & Hein; with fewer than 3 classes, 4 when targeted, the
            CW margin is used instead), ``"cw"`` (the CW margin). For TRADES use
            :func:`~crmt_plugin.attacks.trades_kl_loss` with the clean logits as ``y``.
        schedule: ``"constant"`` (default) or ``"apgd"``: the step-size schedule of APGD (Croce &
            Hein, 2020): initial step ``2 * eps``, momentum 0.75, and at checkpoints (after 22% of
            the steps, then shrinking intervals of at least 6%) the step is halved and the run
            restarted from its best point for every sample whose loss rose in fewer than 75% of the
            steps since the last checkpoint, or whose best loss did not improve when the step was
            not halved at the last checkpoint.
        targets: ``0`` (untargeted, default) or ``k``: one targeted run (x ``restarts``) against each
            of the ``k`` classes with the highest clean logits besides the true one; the loss is
            then the targeted version of the named loss (``"dlr"``: targeted DLR, ``"cw"``:
            ``z_t - z_y``, ``"ce"``: ``-CE(z, t)``) or a ``callable(logits, y, target) -> (B,)``.
            Needs class labels as ``y``.
        keep_best: per sample, return the worst-case iterate seen over all steps (default) rather
            than the last one (the APGD schedule always keeps the best).
        cascade: ``False`` (default): every run attacks the whole batch for all its steps and each
            sample gets its highest-loss point (what adversarial training needs). ``True`` (for
            evaluation; :func:`~crmt_plugin.attacks.strong_attack` sets it): a run drops a sample
            from its working batch as soon as it is misclassified, keeping that input, and each
            later restart / targeted run attacks only the samples no earlier run fooled. The same
            samples end up fooled (each sample's trajectory does not depend on the others: the
            random starts are drawn for the whole batch, see
            :meth:`~crmt_plugin.attacks.base.AttackBatch.subset`), at the cost of the samples still
            standing only; a fooled sample's returned input is the first one that fooled it.

    Cost per call: ``max(1, targets) * restarts * steps`` forward+backward passes, plus one forward
    pass per run (constant schedule with ``keep_best``), one forward+backward per run (APGD: its
    start point), and one forward for targeted runs (to rank the classes; shared with the other
    members of a :class:`~crmt_plugin.attacks.WorstCase`). With ``cascade=True`` these are upper
    bounds per sample: a sample costs passes only while it stands.

    Call: ``attack(model, inputs, y) -> dict`` with the same keys as ``inputs``; device and dtype
    follow the inputs. The model's parameter gradients are left untouched.
    """

    name = "PGD"

    def __init__(
        self,
        eps: Budget,
        *,
        norm: str = "l2",
        modalities: Optional[Union[str, Sequence[str]]] = None,
        steps: int = 10,
        step_size: Optional[Union[float, Mapping[str, float]]] = None,
        random_start: bool = True,
        restarts: int = 1,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        loss: Union[None, str, LossFn] = None,
        generator: Optional[torch.Generator] = None,
        eval_mode: bool = True,
        keep_best: bool = True,
        schedule: str = "constant",
        targets: int = 0,
        call: Optional[ModelCall] = None,
        cascade: bool = False,
    ) -> None:
        super().__init__(eps, norm=norm, modalities=modalities, bounds=bounds, generator=generator,
                         eval_mode=eval_mode, call=call)
        where = type(self).__name__
        if not isinstance(cascade, bool):
            raise CRMTError(f"{where}: cascade must be True or False, found {cascade!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise CRMTError(f"{where}: steps must be a positive int, found {steps!r}")
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
            raise CRMTError(f"{where}: restarts must be a positive int, found {restarts!r}")
        if restarts > 1 and not random_start:
            raise CRMTError(f"{where}: restarts={restarts} without random_start gives identical runs; "
                            "set random_start=True")
        if isinstance(step_size, Mapping):
            if self._budgets is None:
                raise CRMTError(f"{where}: a per-modality step_size needs per-modality budgets (eps as a mapping)")
            if set(step_size) != set(self._budgets):
                raise CRMTError(f"{where}: step_size keys {sorted(step_size)} differ from eps keys "
                                f"{sorted(self._budgets)}")
        elif step_size is not None:
            check_budget(step_size, "step_size")
        if schedule not in _SCHEDULES:
            raise CRMTError(f"{where}: schedule must be one of {_SCHEDULES}, found {schedule!r}")
        if not isinstance(targets, int) or isinstance(targets, bool) or targets < 0:
            raise CRMTError(f"{where}: targets must be an int >= 0 (0: untargeted), found {targets!r}")
        self.loss_name, self.loss = resolve_loss(loss, targeted=targets > 0)
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start
        self.restarts = restarts
        self.keep_best = keep_best
        self.schedule = schedule
        self.targets = targets
        self.cascade = cascade
        self._config.update(steps=steps, step_size=step_size, random_start=random_start, restarts=restarts,
                            loss=loss, keep_best=keep_best, schedule=schedule, targets=targets, cascade=cascade)

    @property
    def label(self) -> str:
        prefix = "APGD" if self.schedule == "apgd" else "PGD"
        if self.targets:
            prefix += "-T"
        named = isinstance(self._config["loss"], str) and self.loss_name != "ce"
        return f"{prefix}-{self.loss_name}-{self.norm}" if named else f"{prefix}-{self.norm}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown()}, loss={self.loss_name})"

    @property
    def cost(self) -> Dict[str, int]:
        """Model passes per call on a full batch: ``{"forward_backward": ..., "forward": ...}``."""
        runs = max(1, self.targets) * self.restarts
        backward = runs * (self.steps + (1 if self.schedule == "apgd" else 0))
        forward = (runs if (self.schedule == "constant" and (self.keep_best or self.restarts > 1)) else 0)
        return {"forward_backward": backward, "forward": forward + (1 if self.targets else 0)}

    # -- the attack ---------------------------------------------------------------------------------

    def _sizes(self, batch: AttackBatch, default: float) -> List[Tensor]:
        """Per-group step sizes (B,): the given step_size, else ``default * eps`` (``2.5 / steps`` or 2)."""
        out = []
        for g in batch.groups:
            step = self.step_size[g.names[0]] if isinstance(self.step_size, Mapping) else self.step_size
            if step is None:
                out.append(default * g.eps)
            else:
                out.append(torch.as_tensor(check_budget(step, "step_size"), dtype=g.eps.dtype, device=g.eps.device)
                           .expand(batch.batch))
        return out

    def _start(self, batch: AttackBatch) -> Dict[str, Tensor]:
        return batch.random_start(self.generator) if self.random_start else batch.zeros()

    def _objective(self, batch: AttackBatch) -> Tuple[List[Optional[Tensor]], Callable[..., Tensor]]:
        """(one target per targeted run, as a (root,) tensor over the called batch, or [None]; the loss
        ``fn(logits, y[, target])``)."""
        fn = self.loss
        if self.loss_name == "dlr" and isinstance(self._config["loss"], str):  # undefined for few classes
            dlr, cw, least = self.loss, resolve_loss("cw", targeted=self.targets > 0)[1], 4 if self.targets else 3

            def fn(z: Tensor, *args: Tensor) -> Tensor:
                return (dlr if z.shape[1] >= least else cw)(z, *args)

        if not self.targets:
            return [None], fn
        if batch.labels is None:
            raise CRMTError(f"{self.label}: targeted runs need class labels (B,) as y")
        clean = batch.clean_logits()
        if clean.shape[1] < 2:
            raise CRMTError(f"{self.label}: targeted runs need at least 2 classes")
        ranked = clean.scatter(1, batch.labels.long().unsqueeze(1).to(clean.device), float("-inf")).argsort(
            dim=1, descending=True)
        targets = []
        for t in range(min(self.targets, clean.shape[1] - 1)):
            full = torch.zeros(batch.root_size, dtype=torch.long, device=batch.rows.device)
            full[batch.rows] = ranked[:, t].to(full.device)
            targets.append(full)
        return targets, fn

    @staticmethod
    def _loss_for(fn: Callable[..., Tensor], target: Optional[Tensor]) -> Callable[[AttackBatch], Callable]:
        """``make(batch) -> loss(logits)`` for a (sub-)batch: the labels and targets of its rows."""
        def make(batch: AttackBatch) -> Callable[[Tensor], Tensor]:
            y = batch.y
            if target is None:
                return lambda z: fn(z, y)
            t = target[batch.rows].to(y.device)
            return lambda z: fn(z, y, t)
        return make

    def run(self, batch: AttackBatch) -> Dict[str, Tensor]:
        targets, fn = self._objective(batch)
        runs = [(target, r) for target in targets for r in range(self.restarts)]
        if len(runs) == 1 and not self.cascade:
            return self._one(batch, self._loss_for(fn, targets[0]), evaluate_last=False).deltas  # type: ignore
        overall = Best()
        for k, (target, _) in enumerate(runs):
            if self.cascade and overall.wrong is not None:
                standing = (~overall.wrong).nonzero().squeeze(1)
                if standing.numel() == 0:
                    break
                sub = batch.subset(standing) if standing.numel() < batch.batch else batch
            else:
                standing, sub = None, batch
            result = self._one(sub, self._loss_for(fn, target), evaluate_last=True)
            score = result.margin if (self.targets and result.margin is not None) else result.score
            assert result.deltas is not None and score is not None and result.wrong is not None
            overall.consider(result.deltas, score, result.wrong,
                             index=standing if (standing is not None and sub is not batch) else None)
        assert overall.deltas is not None
        return overall.deltas

    def _one(self, batch: AttackBatch, make_loss: Callable[[AttackBatch], Callable], evaluate_last: bool) -> Best:
        if self.schedule == "apgd":
            return self._apgd(batch, make_loss)
        return self._constant(batch, make_loss, evaluate_last=evaluate_last)

    def _drop(self, best: Best, active: Tensor, batch: AttackBatch, wrong: Tensor
              ) -> Tuple[Optional[Tensor], Tensor, AttackBatch]:
        """Cascade: the samples of the working batch not yet fooled (``keep`` (n,) bool or None when
        all stay), their positions in the run's batch, and the smaller working batch."""
        if not self.cascade or not bool(wrong.any()):
            return None, active, batch
        keep = ~wrong
        return keep, active[keep], batch.subset(keep.nonzero().squeeze(1))

    def _constant(self, batch: AttackBatch, make_loss: Callable[[AttackBatch], Callable],
                  evaluate_last: bool) -> Best:
        best = Best()
        sizes = self._sizes(batch, 2.5 / self.steps)
        deltas = self._start(batch)
        work, active = batch, torch.arange(batch.batch, device=batch.rows.device)
        loss = make_loss(work)
        tracked = self.keep_best or self.cascade
        for _ in range(self.steps):
            value, wrong, margin, grads = work.evaluate(deltas, loss, need_grad=True)
            if tracked:
                best.consider(deltas, value, wrong, margin, index=None if best.deltas is None else active)
            assert grads is not None
            deltas = work.project(work.step(deltas, grads, sizes))
            keep, active, work = self._drop(best, active, work, wrong)
            if keep is not None:
                if work.batch == 0:
                    return best
                deltas = {n: d[keep] for n, d in deltas.items()}
                sizes = [s[keep] for s in sizes]
                loss = make_loss(work)
        if tracked or evaluate_last:
            value, wrong, margin, _ = work.evaluate(deltas, loss, need_grad=False)
            best.consider(deltas, value, wrong, margin, index=None if best.deltas is None else active)
        else:
            best.deltas = deltas
        return best

    def _apgd(self, batch: AttackBatch, make_loss: Callable[[AttackBatch], Callable]) -> Best:
        steps = self.steps
        interval = max(int(0.22 * steps), 1)
        shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
        sizes = self._sizes(batch, 2.0)
        x = self._start(batch)
        work, active = batch, torch.arange(batch.batch, device=batch.rows.device)
        loss = make_loss(work)
        value, wrong, margin, grad = work.evaluate(x, loss, need_grad=True)
        assert grad is not None
        best = Best()
        best.consider(x, value, wrong, margin)
        best_loss, x_best, grad_best = value.clone(), dict(x), dict(grad)
        previous_loss, x_prev = value, dict(x)
        rises = torch.zeros_like(value)
        best_at_check = best_loss.clone()
        halved_last = torch.ones_like(wrong)
        since = 0
        for i in range(steps):
            keep, active, work = self._drop(best, active, work, wrong)
            if keep is not None:  # the fooled samples leave the run, their fooling input kept in `best`
                if work.batch == 0:
                    return best
                x, x_prev, grad = ({n: t[keep] for n, t in d.items()} for d in (x, x_prev, grad))
                x_best, grad_best = ({n: t[keep] for n, t in d.items()} for d in (x_best, grad_best))
                sizes = [s[keep] for s in sizes]
                best_loss, previous_loss, rises = best_loss[keep], previous_loss[keep], rises[keep]
                best_at_check, halved_last = best_at_check[keep], halved_last[keep]
                loss = make_loss(work)
            momentum = 0.75 if i > 0 else 1.0
            z = work.project(work.step(x, grad, sizes))
            moved = {n: x[n] + momentum * (z[n] - x[n]) + (1 - momentum) * (x[n] - x_prev[n]) for n in x}
            x_prev, x = x, work.project(moved)
            value, wrong, margin, grad = work.evaluate(x, loss, need_grad=True)
            assert grad is not None
            best.consider(x, value, wrong, margin, index=active)
            rises = rises + (value > previous_loss).to(rises.dtype)
            previous_loss = value
            improved = value > best_loss
            x_best, grad_best = _where(improved, x, x_best), _where(improved, grad, grad_best)
            best_loss = torch.where(improved, value, best_loss)
            since += 1
            if since == interval and i < steps - 1:
                stalled = rises <= 0.75 * interval
                no_progress = ~halved_last & (best_at_check >= best_loss)
                halve = stalled | no_progress
                halved_last, best_at_check = halve, best_loss.clone()
                sizes = [torch.where(halve.to(s.device), s / 2, s) for s in sizes]
                x, grad = _where(halve, x_best, x), _where(halve, grad_best, grad)
                rises = torch.zeros_like(rises)
                since = 0
                interval = max(interval - shrink, shortest)
        return best


class FGM(Attack):
    """Fast gradient method: one step of the full budget from the clean point (no random start).

    l2: ``delta = eps * g / ||g||`` (joint norm over the attacked modalities, or per modality with
    per-modality budgets); linf: ``delta = eps * sign(g)`` (FGSM). A zero gradient gives a zero step.
    Cost: one forward+backward pass.

    Example::

        adv = FGM(eps=0.2, modalities="image")(model, inputs, y)     # adv["audio"] is inputs["audio"]

    >>> FGM(eps={"audio": 0.1, "image": 0.3}, norm="linf").label
    'FGM-linf'

    Args: those of :class:`~crmt_plugin.attacks.base.Attack`, and ``loss`` as in :class:`PGD`.
    """

    name = "FGM"

    def __init__(
        self,
        eps: Budget,
        *,
        norm: str = "l2",
        modalities: Optional[Union[str, Sequence[str]]] = None,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        loss: Union[None, str, LossFn] = None,
        eval_mode: bool = True,
        generator: Optional[torch.Generator] = None,
        call: Optional[ModelCall] = None,
    ) -> None:
        super().__init__(eps, norm=norm, modalities=modalities, bounds=bounds, generator=generator,
                         eval_mode=eval_mode, call=call)
        self.loss_name, self.loss = resolve_loss(loss, targeted=False)
        self._config.update(loss=loss)

    @property
    def cost(self) -> Dict[str, int]:
        return {"forward_backward": 1, "forward": 0}

    def run(self, batch: AttackBatch) -> Dict[str, Tensor]:
        y = batch.y
        _, _, _, grads = batch.evaluate(batch.zeros(), lambda z: self.loss(z, y), need_grad=True)
        assert grads is not None
        return batch.project(batch.step(batch.zeros(), grads, [g.eps for g in batch.groups]))
