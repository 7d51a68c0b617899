"""The attack contract: configuration, input checks, mode guard, bounds, budgets and the final
exact projection, shared by every attack of the package.

An attack is an :class:`Attack` subclass with a short :meth:`Attack.run`::

    class MyAttack(Attack):
        name = "Mine"

        def run(self, batch: AttackBatch) -> Dict[str, Tensor]:
            deltas = batch.random_start(self.generator)       # inside every budget and bound
            ...                                               # batch.evaluate(deltas, loss) -> loss, wrong, margin
            return deltas                                     # {name: (B, ...)} perturbations

and is called as ``attack(model, inputs, y) -> adversarial inputs dict``: the base class checks the
inputs, runs :meth:`run` under :class:`~crmt_plugin._runtime.ModeGuard` and makes the returned
perturbations meet their budgets and bounds exactly (:meth:`AttackBatch.finish`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._runtime import ModeGuard, logits_of
from ..errors import CRMTError
from .balls import Ball, bcast, get_ball

__all__ = [
    "Attack",
    "AttackBatch",
    "Group",
    "Best",
    "check_inputs",
    "resolve_modalities",
    "check_budget",
    "wide_dtype",
]

Number = Union[int, float]
BoundValue = Union[Number, Tensor]
Budget = Union[Number, Tensor, Mapping[str, Union[Number, Tensor]]]
ModelCall = Callable[[Any, Mapping[str, Tensor]], Any]


# --------------------------------------------------------------------------------------------------
# helpers shared by the package


def check_inputs(inputs: Any) -> None:
    """Raise unless ``inputs`` is a non-empty mapping name -> tensor."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise CRMTError(
            f"inputs must be a non-empty mapping modality name -> tensor, found {type(inputs).__name__}"
        )


def resolve_modalities(inputs: Mapping[str, Tensor], modalities: Any, where: str) -> Tuple[str, ...]:
    """The named modalities (default: every tensor of ``inputs``), checked to be tensors in ``inputs``."""
    if modalities is None:
        names = tuple(name for name, value in inputs.items() if isinstance(value, Tensor))
    elif isinstance(modalities, str):
        names = (modalities,)
    else:
        names = tuple(modalities)
    if not names:
        raise CRMTError(f"{where}: no modality to act on (modalities={modalities!r})")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CRMTError(f"{where}: modalities {missing} are not in the inputs; available: {list(inputs)}")
    if len(set(names)) != len(names):
        raise CRMTError(f"{where}: modality listed twice in {list(names)}")
    for n in names:
        x = inputs[n]
        if not isinstance(x, Tensor):
            raise CRMTError(f"{where}: inputs[{n!r}] must be a tensor, found {type(x).__name__}")
    return names


def check_budget(value: Any, what: str) -> Union[float, Tensor]:
    """A budget: a finite number >= 0 (as float) or a float tensor (B,) of them (detached)."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.dim() != 1 or not value.is_floating_point():
                raise CRMTError(f"{what} must be a number or a float tensor of shape (B,), found "
                                f"{value.dtype} {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise CRMTError(f"{what} must be finite and >= 0 for every sample")
            return value.detach()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CRMTError(f"{what} must be a finite number >= 0 (or a tensor (B,) of them), found {value!r}")
    return float(value)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact budget bookkeeping, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------------------------------
# one prepared batch


class Group:
    """Modalities sharing one budget: ``names``, the per-sample budget ``eps`` (B,) in float64 (float32
    on MPS) and the ball of the norm."""

    def __init__(self, names: Tuple[str, ...], eps: Tensor, ball: Ball) -> None:
        self.names, self.eps, self.ball = names, eps, ball

    def __repr__(self) -> str:
        return f"Group({self.names}, {self.ball.norm})"


class Best:
    """Per-sample worst case over candidate perturbations: a misclassifying candidate beats a
    non-misclassifying one; ties are broken by the higher score (loss or margin)."""

    def __init__(self) -> None:
        self.deltas: Optional[Dict[str, Tensor]] = None
        self.score: Optional[Tensor] = None
        self.wrong: Optional[Tensor] = None
        self.margin: Optional[Tensor] = None

    def consider(self, deltas: Mapping[str, Tensor], score: Tensor, wrong: Tensor,
                 margin: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Tensor:
        """Keep the candidate where it is better; returns the (B,) bool of samples it improved.

        ``index`` (n,): the candidate covers only these rows of the tracked batch (its tensors have
        n rows; the tracker must already hold a full-size candidate)."""
        if index is not None:
            assert self.deltas is not None and self.score is not None and self.wrong is not None
            sub = Best()
            sub.deltas = {n: d[index] for n, d in self.deltas.items()}
            sub.score, sub.wrong = self.score[index], self.wrong[index]
            sub.margin = self.margin[index] if self.margin is not None else None
            better = sub.consider(deltas, score, wrong, margin)
            for n, d in sub.deltas.items():
                self.deltas[n][index] = d
            self.score[index], self.wrong[index] = sub.score, sub.wrong
            if self.margin is not None and sub.margin is not None:
                self.margin[index] = sub.margin
            return better
        if self.deltas is None:
            self.deltas = {n: d.detach().clone() for n, d in deltas.items()}
            self.score, self.wrong = score.clone(), wrong.clone()
            self.margin = margin.clone() if margin is not None else None
            return torch.ones_like(wrong)
        assert self.score is not None and self.wrong is not None
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (score > self.score))
        for n in self.deltas:
            self.deltas[n] = torch.where(bcast(better, self.deltas[n]).bool(), deltas[n].detach(), self.deltas[n])
        self.score = torch.where(better, score, self.score)
        self.wrong = self.wrong | (better & wrong)
        if self.margin is not None and margin is not None:
            self.margin = torch.where(better, margin, self.margin)
        return better


class AttackBatch:
    """The checked batch an attack works on.

    Attributes: ``model``, ``names`` (attacked modalities), ``xs`` (their clean tensors, detached),
    ``y``, ``labels`` (``y`` when it holds class indices, else ``None``), ``batch`` (B), ``groups``
    (:class:`Group` list), ``bounds`` ({name: (lo, hi)} tensors), ``call``, ``rows`` (B,): the
    positions of these samples in the batch the attack was called on (see :meth:`subset`).

    **Sub-batches.** :meth:`subset` gives the same batch restricted to some samples: an attack that
    drops the samples it has already fooled works on ever smaller sub-batches. Random noise
    (:meth:`noise`) is always drawn for the whole called batch and then indexed, so each sample sees
    the same random numbers whichever other samples are still in the batch: on a model without
    interaction between samples, a sample's attack trajectory does not depend on the others.
    """

    def __init__(self, attack: "Attack", model: Any, inputs: Mapping[str, Tensor], y: Tensor) -> None:
        where = attack.label
        check_inputs(inputs)
        names = resolve_modalities(inputs, attack.modalities, where)
        xs: Dict[str, Tensor] = {}
        for n in names:
            x = inputs[n]
            if not x.is_floating_point():
                raise CRMTError(f"{where}: cannot attack modality {n!r} of dtype {x.dtype}; only floating tensors")
            xs[n] = x.detach().clone() if x.is_inference() else x.detach()
        batch = xs[names[0]].shape[0]
        for n, x in xs.items():
            if x.dim() == 0 or x.shape[0] != batch:
                raise CRMTError(f"{where}: modality {n!r} has shape {tuple(x.shape)}, expected batch size "
                                f"{batch} first")
        if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != batch:
            raise CRMTError(f"{where}: y must be a tensor with batch size {batch} first, found "
                            f"{getattr(y, 'shape', type(y))}")
        y = y.detach().to(xs[names[0]].device)
        self.where = where
        self.model = model
        self.call = attack.call
        self.names = names
        self.xs = xs
        self.y = y
        self.labels = y if (y.dim() == 1 and not y.is_floating_point() and not y.is_complex()) else None
        self.batch = batch
        self.inputs = inputs
        self.groups = attack.groups(names, xs[names[0]])
        self.bounds = attack.bounds_for(names, inputs)
        # what the model sees for the fixed modalities (inference-mode tensors cannot enter autograd)
        self.held = {k: (v.clone() if isinstance(v, Tensor) and v.is_inference() else v) for k, v in inputs.items()}
        self.rows = torch.arange(batch, device=y.device)
        self.root_size = batch
        self.is_root = True  # False for a sub-batch (:meth:`subset`)
        self.shared: Dict[str, Any] = {}  # per called batch, shared by every sub-batch (the clean logits)

    # -- sub-batches --------------------------------------------------------------------------------

    def subset(self, index: Tensor) -> "AttackBatch":
        """This batch restricted to the samples at positions ``index`` (n,) of it (a long tensor, or a
        (B,) bool mask): inputs, labels, budgets and per-sample bounds are indexed, ``rows`` maps to
        the called batch, noise and the clean logits are shared."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        index = index.to(self.rows.device)
        sub = object.__new__(AttackBatch)
        sub.__dict__.update(self.__dict__)
        b = self.batch

        def take(v: Any) -> Any:
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == b:
                return v[index.to(v.device)]
            return v

        sub.rows = self.rows[index]
        sub.is_root = False
        sub.batch = int(index.numel())
        sub.xs = {n: x[index.to(x.device)] for n, x in self.xs.items()}
        sub.y = self.y[index.to(self.y.device)]
        sub.labels = sub.y if self.labels is not None else None
        sub.held = {k: take(v) for k, v in self.held.items()}
        sub.inputs = {k: take(v) for k, v in self.inputs.items()}
        sub.groups = [Group(g.names, g.eps[index.to(g.eps.device)], g.ball) for g in self.groups]
        bounds: Dict[str, Tuple[Tensor, Tensor]] = {}
        for n, pair in self.bounds.items():
            dims = self.xs[n].dim()
            bounds[n] = tuple(  # type: ignore[assignment]
                t[index.to(t.device)] if (t.dim() == dims and t.shape[0] == b and b > 1) else t for t in pair)
        sub.bounds = bounds
        return sub

    def clean_logits(self) -> Tensor:
        """The model's logits (B, K) at the clean inputs: one forward for the called batch, shared by
        its sub-batches (and by the members of a :class:`~crmt_plugin.attacks.WorstCase`)."""
        clean = self.shared.get("clean")
        if clean is None:
            if not self.is_root:  # computed on this sub-batch only
                return self.logits(self.zeros())
            clean = self.shared["clean"] = self.logits(self.zeros())
        return clean if self.is_root else clean[self.rows.to(clean.device)]

    # -- model evaluations --------------------------------------------------------------------------

    def logits(self, deltas: Mapping[str, Tensor]) -> Tensor:
        """The model's logits (B, K) at ``x + deltas`` (no gradient)."""
        with torch.no_grad():
            current = dict(self.held)
            for n in self.names:
                current[n] = self.xs[n] + deltas[n]
            return logits_of(self.model, current, self.call).detach()

    def wrong_and_margin(self, logits: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(misclassified (B,) bool, CW margin ``max_{k != y} z_k - z_y`` (B,) or None without labels)."""
        if self.labels is None:
            return torch.zeros(self.batch, dtype=torch.bool, device=logits.device), None
        index = self.labels.long().unsqueeze(1)
        z_y = logits.gather(1, index).squeeze(1)
        margin = logits.scatter(1, index, float("-inf")).amax(dim=1) - z_y
        return logits.argmax(dim=1) != self.labels, margin

    def evaluate(
        self, deltas: Mapping[str, Tensor], loss: Callable[[Tensor], Tensor], need_grad: bool
    ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Dict[str, Tensor]]]:
        """``(loss (B,), wrong (B,), margin (B,) or None, grads or None)`` at ``x + deltas``;
        ``loss`` maps the logits to the per-sample objective."""
        if need_grad:
            deltas = {n: d.detach().requires_grad_(True) for n, d in deltas.items()}
        with torch.set_grad_enabled(need_grad):  # also inside a caller's torch.no_grad()
            current = dict(self.held)
            for n in self.names:
                current[n] = self.xs[n] + deltas[n]
            logits = logits_of(self.model, current, self.call)
            value = loss(logits)
            if not isinstance(value, Tensor) or value.shape != (self.batch,):
                raise CRMTError(
                    f"{self.where}: the loss must return one value per sample, shape ({self.batch},), found "
                    f"{getattr(value, 'shape', type(value).__name__)}; use reduction='none'"
                )
            grads = None
            if need_grad:
                found = torch.autograd.grad(value.sum(), [deltas[n] for n in self.names], allow_unused=True)
                grads = {n: (g if g is not None else torch.zeros_like(self.xs[n])) for n, g in zip(self.names, found)}
        wrong, margin = self.wrong_and_margin(logits.detach())
        return value.detach(), wrong, margin, grads

    # -- geometry -----------------------------------------------------------------------------------

    def zeros(self) -> Dict[str, Tensor]:
        return {n: torch.zeros_like(self.xs[n]) for n in self.names}

    def noise(self, generator: Optional[torch.Generator]) -> Callable[[Tensor, str], Tensor]:
        """``noise(like, kind)``: normal / uniform / sign (+-1) noise shaped like ``like`` (batch
        first), drawn from ``generator`` on its device and moved to ``like``'s device. Drawn for the
        whole called batch and indexed by :attr:`rows`, so a sub-batch's samples get the numbers they
        would get in the whole batch."""
        rows, root, whole = self.rows, self.root_size, self.is_root

        def draw(like: Tensor, kind: str) -> Tensor:
            device = generator.device if generator is not None else like.device
            acc = torch.promote_types(like.dtype, torch.float32)
            shape = like.shape
            partial = not whole and like.dim() >= 1 and like.shape[0] == rows.numel()
            if partial:
                shape = torch.Size((root,) + tuple(like.shape[1:]))
            if kind == "normal":
                t = torch.randn(shape, generator=generator, device=device, dtype=acc)
            elif kind == "uniform":
                t = torch.rand(shape, generator=generator, device=device, dtype=acc)
            else:
                t = torch.randint(0, 2, shape, generator=generator, device=device).to(acc) * 2 - 1
            if partial:
                t = t[rows.to(t.device)]
            return t.to(like.device)

        return draw

    def random_start(self, generator: Optional[torch.Generator]) -> Dict[str, Tensor]:
        """A random point of every group's ball, projected into the bounds."""
        noise = self.noise(generator)
        deltas: Dict[str, Tensor] = {}
        for g in self.groups:
            for n, d in zip(g.names, g.ball.random(noise, [self.xs[n] for n in g.names], g.eps)):
                deltas[n] = d
        return self.project(deltas)

    def project(self, deltas: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Project onto every budget, then into the bounds (clamping only shrinks |delta|: x is inside)."""
        out: Dict[str, Tensor] = {}
        for g in self.groups:
            for n, d in zip(g.names, g.ball.project([deltas[n] for n in g.names], g.eps)):
                out[n] = d
        for n, (lo, hi) in self.bounds.items():
            out[n] = torch.clamp(self.xs[n] + out[n], lo, hi) - self.xs[n]
        return out

    def step(
        self, deltas: Mapping[str, Tensor], grads: Mapping[str, Tensor], sizes: Sequence[Tensor]
    ) -> Dict[str, Tensor]:
        """``deltas`` plus each group's steepest-ascent step of per-sample length ``sizes[i]`` (not projected)."""
        out = dict(deltas)
        for g, size in zip(self.groups, sizes):
            for n, s in zip(g.names, g.ball.step([grads[n] for n in g.names], size)):
                out[n] = deltas[n] + s
        return out

    def finish(self, deltas: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The adversarial inputs dict: the *actual* perturbation ``adv - x`` (after rounding) meets
        every budget and bound exactly; untouched modalities are the very same tensor objects.

        The projection is done in float64 (float32 on MPS); rounding ``x + d`` back to the input dtype
        may move a coordinate outwards by half an ulp, so such coordinates are moved one ulp towards
        ``x``: then ``|adv_i - x_i| <= |d_i|`` for every coordinate and the budget holds exactly.
        """
        adv = {n: (self.xs[n] + deltas[n]).detach() for n in self.names}
        out: Dict[str, Tensor] = {}
        for g in self.groups:
            wide = wide_dtype(self.xs[g.names[0]].device)
            x64 = [self.xs[n].to(wide) for n in g.names]
            d64 = g.ball.project([adv[n].to(wide) - x for n, x in zip(g.names, x64)], g.eps.to(wide))
            for n, x, d in zip(g.names, x64, d64):
                cand = (x + d).to(self.xs[n].dtype)
                outward = (cand.to(wide) - x).abs() > d.abs()
                out[n] = torch.where(outward, torch.nextafter(cand, self.xs[n]), cand)
        for n, (lo, hi) in self.bounds.items():
            out[n] = torch.clamp(out[n], lo, hi)  # x inside [lo, hi]: clamping only moves towards x
        return {k: (out[k] if k in out else v) for k, v in self.inputs.items()}


# --------------------------------------------------------------------------------------------------
# the base class


class Attack:
    """Base class of every attack: ``attack(model, inputs, y) -> adversarial inputs dict``.

    Args (shared by every attack):
        eps: a number (one joint budget over the attacked modalities) or a mapping name -> budget
            (per-modality budgets; its keys are the attacked modalities). Any budget may also be a
            float tensor ``(B,)``, one per sample.
        norm: a registered ball, ``"l2"`` or ``"linf"`` (:mod:`crmt_plugin.attacks.balls`).
        modalities: names to perturb (default: the keys of ``eps`` if a mapping, else every tensor in
            the inputs at call time). The others are returned as the very same tensor objects.
        bounds: optional valid input ranges ``{name: (lo, hi)}``, scalars or tensors broadcastable
            to the modality's tensor; nothing is clamped where no bound is given (no hidden [0, 1]).
            Clean inputs must lie inside their bounds (up to rounding).
        generator: a ``torch.Generator`` for reproducible randomness (any device).
        eval_mode: run the model in eval mode (default) and restore every submodule's ``training``
            flag afterwards; ``False`` keeps the current mode.
        call: how to call the model, ``call(model, inputs) -> output`` (default ``model(inputs)``, or
            ``model(**inputs)`` when the forward names the modalities); the output is logits (B, K) or has ``.logits``.

    ``attack.replace(**changes)`` gives a copy with some settings changed; ``attack.label`` is a short
    name for tables (``"PGD-l2"``).
    """

    name = "Attack"

    def __init__(
        self,
        eps: Budget,
        *,
        norm: str = "l2",
        modalities: Optional[Union[str, Sequence[str]]] = None,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        generator: Optional[torch.Generator] = None,
        eval_mode: bool = True,
        call: Optional[ModelCall] = None,
    ) -> None:
        where = type(self).__name__
        self.ball = get_ball(norm) if isinstance(norm, str) else get_ball(str(norm))
        if isinstance(eps, Mapping):
            if not eps:
                raise CRMTError(f"{where}: eps mapping is empty; give at least one modality's budget")
            if modalities is not None:
                given = (modalities,) if isinstance(modalities, str) else tuple(modalities)
                if set(given) != set(eps):
                    raise CRMTError(
                        f"{where}: per-modality eps keys {sorted(eps)} differ from modalities {sorted(given)}; "
                        "with per-modality budgets leave `modalities` out (the keys are the attacked ones)"
                    )
            self._budgets: Optional[Dict[str, Union[float, Tensor]]] = {
                str(k): check_budget(v, f"eps[{k!r}]") for k, v in eps.items()}
            self._joint_eps: Optional[Union[float, Tensor]] = None
            self._attacked: Optional[Tuple[str, ...]] = tuple(self._budgets)
        else:
            self._budgets = None
            self._joint_eps = check_budget(eps, "eps")
            attacked = None if modalities is None else (
                (modalities,) if isinstance(modalities, str) else tuple(modalities))
            if attacked is not None and not attacked:
                raise CRMTError(f"{where}: modalities is empty; name at least one modality to attack")
            self._attacked = attacked
        if bounds is not None and not isinstance(bounds, Mapping):
            raise CRMTError(f"{where}: bounds must be a mapping name -> (lo, hi), found {type(bounds).__name__}")
        for key, pair in (bounds or {}).items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CRMTError(f"{where}: bounds[{key!r}] must be a pair (lo, hi), found {pair!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise CRMTError(f"{where}: generator must be a torch.Generator, found {type(generator).__name__}")
        if call is not None and not callable(call):
            raise CRMTError(f"{where}: call must be a callable(model, inputs) -> output, found {type(call).__name__}")
        self.eps = eps
        self.norm = self.ball.norm
        self.bounds = dict(bounds) if bounds is not None else {}
        self.generator = generator
        self.eval_mode = eval_mode
        self.call = call
        self._config: Dict[str, Any] = dict(eps=eps, norm=norm, modalities=modalities, bounds=bounds,
                                            generator=generator, eval_mode=eval_mode, call=call)

    # -- configuration ------------------------------------------------------------------------------

    @property
    def modalities(self) -> Optional[Tuple[str, ...]]:
        """The attacked modalities (``None``: every tensor in the inputs at call time)."""
        return self._attacked

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"PGD-l2"``."""
        return f"{self.name}-{self.norm}"

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments (a copy)."""
        return dict(self._config)

    def replace(self, **changes: Any) -> "Attack":
        """A copy with some settings changed, e.g. ``attack.replace(eps=0.5, modalities=["audio"])``."""
        unknown = set(changes) - set(self._config)
        if unknown:
            raise CRMTError(f"{type(self).__name__}.replace: unknown settings {sorted(unknown)}; "
                            f"known: {sorted(self._config)}")
        config = {**self._config, **changes}
        if "eps" in changes and "modalities" not in changes and isinstance(self._config["eps"], Mapping):
            if not isinstance(changes["eps"], Mapping):
                config["modalities"] = tuple(self._config["eps"])
        if "eps" in changes and isinstance(changes["eps"], Mapping) and "modalities" not in changes:
            config["modalities"] = None
        return type(self)(**config)

    def _shown(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items()
                         if k not in ("loss", "generator", "call", "attacks"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown()})"

    # -- per batch ----------------------------------------------------------------------------------

    def groups(self, names: Tuple[str, ...], like: Tensor) -> List[Group]:
        """The budget groups for the attacked ``names``, budgets (B,) in float64 on the inputs' device."""
        batch = like.shape[0]
        acc = wide_dtype(like.device)

        def per_sample(value: Union[float, Tensor], what: str) -> Tensor:
            t = torch.as_tensor(value, dtype=acc, device=like.device)
            if t.dim() == 0:
                return t.expand(batch)
            if t.shape != (batch,):
                raise CRMTError(f"{type(self).__name__}: {what} has shape {tuple(t.shape)}, expected ({batch},) "
                                "(one per sample)")
            return t

        if self._budgets is not None:
            return [Group((n,), per_sample(self._budgets[n], f"eps[{n!r}]"), self.ball) for n in names]
        assert self._joint_eps is not None
        return [Group(names, per_sample(self._joint_eps, "eps"), self.ball)]

    def bounds_for(self, names: Tuple[str, ...], inputs: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{name: (lo, hi)}`` tensors for the attacked modalities that have bounds, checked against
        the clean inputs (a coordinate a rounding step outside is never pushed further out)."""
        where = type(self).__name__
        unknown = [k for k in self.bounds if k not in inputs]
        if unknown:
            raise CRMTError(f"{where}: bounds given for {unknown}, which are not in the inputs {list(inputs)}")
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        for n in names:
            if n not in self.bounds:
                continue
            x = inputs[n]
            lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in self.bounds[n])
            try:
                torch.broadcast_shapes(lo.shape, x.shape)
                torch.broadcast_shapes(hi.shape, x.shape)
            except RuntimeError:
                raise CRMTError(
                    f"{where}: bounds[{n!r}] of shapes {tuple(lo.shape)}, {tuple(hi.shape)} do not broadcast "
                    f"to the modality's tensor {tuple(x.shape)}"
                ) from None
            if bool((lo > hi).any()):
                raise CRMTError(f"{where}: bounds[{n!r}] has lo > hi somewhere")
            below = ((lo - x) / (1 + lo.abs())).nan_to_num(0.0).amax().item() if x.numel() else 0.0
            above = ((x - hi) / (1 + hi.abs())).nan_to_num(0.0).amax().item() if x.numel() else 0.0
            if max(below, above) > 1e-5:
                raise CRMTError(
                    f"{where}: clean inputs[{n!r}] lie outside bounds[{n!r}] (found min {x.min().item():.6g}, "
                    f"max {x.max().item():.6g}); give the range of the space the model sees (e.g. normalised units)"
                )
            if below > 0 or above > 0:
                lo, hi = torch.minimum(lo, x), torch.maximum(hi, x)
            out[n] = (lo, hi)
        return out

    def run(self, batch: AttackBatch) -> Dict[str, Tensor]:
        """The attack itself: the perturbations ``{name: (B, ...)}`` of the attacked modalities."""
        raise NotImplementedError

    def __call__(self, model: Callable[..., Any], inputs: Mapping[str, Tensor], y: Tensor) -> Dict[str, Tensor]:
        if torch.is_inference_mode_enabled():
            raise CRMTError(f"{type(self).__name__} needs gradients: call it outside torch.inference_mode() "
                            "(torch.no_grad() is fine)")
        batch = AttackBatch(self, model, inputs, y)
        with ModeGuard(model, self.eval_mode):
            deltas = self.run(batch)
        return batch.finish(deltas)
