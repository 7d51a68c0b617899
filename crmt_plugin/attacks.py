"""Multi-modal attacks: FGM / PGD on any subset of modalities, missing modality, single-tensor adapter.

One uniform contract, like torchattacks but for a dict of modalities::

    >>> attack = PGD(eps=1.0, norm="l2", modalities=["audio"], steps=10, restarts=2)
    >>> adv = attack(model, inputs, y)          # inputs: {"audio": (B, 13, 32), "image": (B, 1, 28, 28)}
    >>> adv["image"] is inputs["image"]         # untouched modalities: the very same tensors
    True

``model`` is any callable taking the dict of tensors (``model(inputs)``; a module whose forward
takes the modalities as keywords only is called as ``model(**inputs)``) and returning logits
``(B, K)`` or an object with a ``.logits`` attribute (a ``CRMTWrapper`` returns a ``CRMTOutput``).
Pass the ``nn.Module`` itself rather than a lambda around it, so that its mode can be managed.

Budgets (per sample, always respected exactly after a final projection, up to the floating-point
rounding of ``x + delta``):

* ``eps=1.0`` (a number): one *joint* budget over the attacked modalities;
  l2: ``sqrt(sum_m ||delta_m||_2^2) <= eps``, linf: ``max_m ||delta_m||_inf <= eps``.
* ``eps={"audio": 0.5, "image": 2.0}``: one budget per modality; the keys are the attacked ones.
* any budget may be a float tensor of shape ``(B,)``: one budget per sample (e.g. to measure
  minimal adversarial distances by bisection).

Model mode: by default the attack runs the model in eval mode (BatchNorm uses its running
statistics and does not update them, dropout is off) and afterwards restores the ``training`` flag
of *every* submodule exactly as it was. ``eval_mode=False`` keeps whatever mode the model is in.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._runtime import ModeGuard, logits_of
from .errors import CRMTError

__all__ = [
    "FGM",
    "PGD",
    "cross_entropy_loss",
    "margin_loss",
    "trades_kl_loss",
    "drop_modality",
    "modality_means",
    "ModalityAdapter",
]

Number = Union[int, float]
BoundValue = Union[Number, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

_NORMS = ("l2", "linf")


# --------------------------------------------------------------------------------------------------
# losses: callable(logits (B, K), y) -> per-sample loss (B,), maximised by the attack


def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, the default attack loss.

    Example::

        >>> cross_entropy_loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).shape   # (B,)
        torch.Size([4])
    """
    return nn.functional.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample Carlini-Wagner margin ``max_{k != y} z_k - z_y`` (> 0 exactly when misclassified).

    Example::

        >>> margin_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0]))
        tensor([-1.])
    """
    z_y = logits.gather(1, y.long().unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, y.long().unsqueeze(1), float("-inf"))
    return others.amax(dim=1) - z_y


def trades_kl_loss(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Per-sample ``KL(softmax(target_logits) || softmax(logits))``, the TRADES inner objective.

    Pass the *clean* model's logits (detached) in place of the labels::

        >>> clean = model(inputs).detach()                    # (B, K)
        >>> adv = PGD(eps=0.5, loss=trades_kl_loss)(model, inputs, clean)

    The KL gradient is exactly zero at the clean point, so keep ``random_start=True`` (the default).
    """
    if target_logits.shape != logits.shape:
        raise CRMTError(
            f"trades_kl_loss expects target logits of the same shape as the logits {tuple(logits.shape)}, "
            f"found {tuple(target_logits.shape)}; pass the clean model's logits as `y`"
        )
    log_p = nn.functional.log_softmax(target_logits.detach(), dim=1)
    log_q = nn.functional.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# helpers shared with evaluation.py


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, Mapping) or not inputs:
        raise CRMTError(
            f"inputs must be a non-empty mapping modality name -> tensor, found {type(inputs).__name__}"
        )


def _resolve_modalities(inputs: Mapping[str, Tensor], modalities: Any, where: str) -> Tuple[str, ...]:
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


def _flat_sq_norm(t: Tensor) -> Tensor:
    """Per-sample squared l2 norm (B,) in at least float32 (never underflows in half precision)."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return t.reshape(t.shape[0], -1).to(acc).pow(2).sum(dim=1)


def _wide(device: torch.device) -> torch.dtype:
    """float64 for exact budget bookkeeping, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching ``like``, in ``like``'s dtype."""
    return v.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


# --------------------------------------------------------------------------------------------------
# PGD / FGM


class PGD:
    """Projected gradient descent on any subset of modalities, l2 or linf, joint or per-modality budgets.

    Example::

        >>> attack = PGD(eps=1.0, norm="l2", modalities=["audio"], steps=10, restarts=2,
        ...              bounds={"audio": (-3.0, 3.0)}, generator=torch.Generator().manual_seed(0))
        >>> adv = attack(model, {"audio": a, "image": v}, y)    # a: (B, 13, 32), v: (B, 1, 28, 28), y: (B,)
        >>> adv["audio"].shape, adv["image"] is v
        (torch.Size([B, 13, 32]), True)
        >>> PGD(eps={"audio": 0.5, "image": 2.0}, norm="l2")     # one budget per modality

    Args:
        eps: a number (one joint budget over the attacked modalities) or a mapping name -> budget
            (per-modality budgets; its keys are the attacked modalities). Any budget may also be a
            float tensor ``(B,)``, one per sample.
        norm: ``"l2"`` or ``"linf"``.
        modalities: names to perturb (default: the keys of ``eps`` if a mapping, else every tensor in
            the inputs at call time). The others are returned as the very same tensor objects.
        steps: gradient steps per restart.
        step_size: ``None`` (``2.5 * eps / steps`` for each budget), a number (absolute, for every
            budget) or a mapping name -> step (per-modality budgets only).
        random_start: start at a random point of the budget: l2, a uniformly random direction and a
            radius uniform in [0, eps] (as torchattacks); linf, uniform in the box.
        restarts: independent runs; per sample the worst case is kept (a misclassifying run beats a
            non-misclassifying one; ties are broken by the higher loss).
        bounds: optional valid input ranges ``{name: (lo, hi)}``, scalars or tensors broadcastable
            to the modality's tensor; nothing is clamped where no bound is given. Clean inputs must
            lie inside their bounds (up to rounding: a coordinate a hair outside is never pushed
            further out).
        loss: ``callable(logits, y) -> (B,)`` maximised by the attack; default
            :func:`cross_entropy_loss`. For TRADES use :func:`trades_kl_loss` with the clean logits as ``y``.
        generator: a ``torch.Generator`` for reproducible random starts (any device; the noise is
            moved to the inputs' device).
        eval_mode: run the model in eval mode (default) and restore every submodule's ``training``
            flag afterwards; ``False`` keeps the current mode (BatchNorm would then update its
            running statistics during the attack).
        keep_best: per sample, return the worst-case iterate seen over all steps (default) rather
            than the last one.

    Call: ``attack(model, inputs, y) -> dict`` with the same keys as ``inputs``; device and dtype
    follow the inputs. The model's parameter gradients are left untouched.
    """

    name = "PGD"

    def __init__(
        self,
        eps: Union[Number, Mapping[str, Number]],
        *,
        norm: str = "l2",
        modalities: Optional[Union[str, Sequence[str]]] = None,
        steps: int = 10,
        step_size: Optional[Union[Number, Mapping[str, Number]]] = None,
        random_start: bool = True,
        restarts: int = 1,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        loss: Optional[LossFn] = None,
        generator: Optional[torch.Generator] = None,
        eval_mode: bool = True,
        keep_best: bool = True,
    ) -> None:
        self._config = dict(
            eps=eps, norm=norm, modalities=modalities, steps=steps, step_size=step_size,
            random_start=random_start, restarts=restarts, bounds=bounds, loss=loss,
            generator=generator, eval_mode=eval_mode, keep_best=keep_best,
        )  # fmt: skip
        where = type(self).__name__
        if norm not in _NORMS:
            raise CRMTError(f"{where}: norm must be one of {_NORMS}, found {norm!r}")
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
            budgets: Optional[Dict[str, Union[float, Tensor]]] = {str(k): self._check_eps(v, f"eps[{k!r}]") for k, v in eps.items()}
            joint_eps = None
            attacked: Optional[Tuple[str, ...]] = tuple(budgets)
        else:
            budgets = None
            joint_eps = self._check_eps(eps, "eps")
            attacked = None if modalities is None else ((modalities,) if isinstance(modalities, str) else tuple(modalities))
            if attacked is not None and not attacked:
                raise CRMTError(f"{where}: modalities is empty; name at least one modality to attack")
        if not isinstance(steps, int) or steps < 1:
            raise CRMTError(f"{where}: steps must be a positive int, found {steps!r}")
        if not isinstance(restarts, int) or restarts < 1:
            raise CRMTError(f"{where}: restarts must be a positive int, found {restarts!r}")
        if restarts > 1 and not random_start:
            raise CRMTError(f"{where}: restarts={restarts} without random_start gives identical runs; set random_start=True")
        if isinstance(step_size, Mapping):
            if budgets is None:
                raise CRMTError(f"{where}: a per-modality step_size needs per-modality budgets (eps as a mapping)")
            if set(step_size) != set(budgets):
                raise CRMTError(f"{where}: step_size keys {sorted(step_size)} differ from eps keys {sorted(budgets)}")
        elif step_size is not None:
            self._check_eps(step_size, "step_size")
        if bounds is not None and not isinstance(bounds, Mapping):
            raise CRMTError(f"{where}: bounds must be a mapping name -> (lo, hi), found {type(bounds).__name__}")
        for key, pair in (bounds or {}).items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CRMTError(f"{where}: bounds[{key!r}] must be a pair (lo, hi), found {pair!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise CRMTError(f"{where}: generator must be a torch.Generator, found {type(generator).__name__}")
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start
        self.restarts = restarts
        self.bounds = dict(bounds) if bounds is not None else {}
        self.loss = loss if loss is not None else cross_entropy_loss
        self.generator = generator
        self.eval_mode = eval_mode
        self.keep_best = keep_best
        self._budgets = budgets
        self._joint_eps = joint_eps
        self._attacked = attacked

    # -- configuration ------------------------------------------------------------------------------

    @staticmethod
    def _check_eps(value: Any, what: str) -> Union[float, Tensor]:
        if isinstance(value, Tensor):
            if value.dim() == 0:
                value = value.item()
            else:
                if value.dim() != 1 or not value.is_floating_point():
                    raise CRMTError(f"{what} must be a number or a float tensor of shape (B,), found {value.dtype} {tuple(value.shape)}")
                if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                    raise CRMTError(f"{what} must be finite and >= 0 for every sample")
                return value.detach()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise CRMTError(f"{what} must be a finite number >= 0 (or a tensor (B,) of them), found {value!r}")
        return float(value)

    @property
    def modalities(self) -> Optional[Tuple[str, ...]]:
        """The attacked modalities (``None``: every tensor in the inputs at call time)."""
        return self._attacked

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"PGD-l2"``."""
        return f"{self.name}-{self.norm}"

    def replace(self, **changes: Any) -> "PGD":
        """A copy with some settings changed, e.g. ``attack.replace(eps=0.5, modalities=["audio"])``."""
        unknown = set(changes) - set(self._config)
        if unknown:
            raise CRMTError(f"{type(self).__name__}.replace: unknown settings {sorted(unknown)}; known: {sorted(self._config)}")
        config = {**self._config, **changes}
        if "eps" in changes and "modalities" not in changes and isinstance(self._config["eps"], Mapping):
            if not isinstance(changes["eps"], Mapping):
                config["modalities"] = tuple(self._config["eps"])
        if "eps" in changes and isinstance(changes["eps"], Mapping) and "modalities" not in changes:
            config["modalities"] = None
        return type(self)(**config)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._config.items() if k not in ("loss", "generator"))
        loss_name = getattr(self.loss, "__name__", type(self.loss).__name__)
        return f"{type(self).__name__}({shown}, loss={loss_name})"

    # -- the attack ---------------------------------------------------------------------------------

    def _groups(self, names: Tuple[str, ...], like: Tensor) -> List[Tuple[Tuple[str, ...], Tensor, Tensor]]:
        """[(modalities sharing one budget, eps (B,), step size (B,))] in float64 (float32 on MPS) on the inputs' device."""
        batch = like.shape[0]
        acc = _wide(like.device)  # budgets kept in float64: the final check compares against them

        def per_sample(value: Union[float, Tensor], what: str) -> Tensor:
            t = torch.as_tensor(value, dtype=acc, device=like.device)
            if t.dim() == 0:
                return t.expand(batch)
            if t.shape != (batch,):
                raise CRMTError(f"{type(self).__name__}: {what} has shape {tuple(t.shape)}, expected ({batch},) (one per sample)")
            return t

        specs: List[Tuple[Tuple[str, ...], Union[float, Tensor], Any, str]] = []
        if self._budgets is not None:
            for n in names:
                step = self.step_size[n] if isinstance(self.step_size, Mapping) else self.step_size
                specs.append(((n,), self._budgets[n], step, f"eps[{n!r}]"))
        else:
            specs.append((names, self._joint_eps, self.step_size, "eps"))  # type: ignore[arg-type]
        groups = []
        for group, eps, step, what in specs:
            eps_t = per_sample(eps, what)
            if step is None:
                step_t = 2.5 * eps_t / self.steps
            else:
                step_t = per_sample(self._check_eps(step, "step_size"), "step_size")
            groups.append((group, eps_t, step_t))
        return groups

    def _bounds_for(self, names: Tuple[str, ...], inputs: Mapping[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
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
            # clean inputs must lie inside their bounds, up to rounding (float64 bounds, float32 data);
            # a coordinate slightly outside is never pushed further out: effective [min(lo, x), max(hi, x)]
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

    def _noise(self, like: Tensor, kind: str) -> Tensor:
        gen = self.generator
        device = gen.device if gen is not None else like.device
        acc = torch.promote_types(like.dtype, torch.float32)
        if kind == "normal":
            t = torch.randn(like.shape, generator=gen, device=device, dtype=acc)
        else:
            t = torch.rand(like.shape, generator=gen, device=device, dtype=acc)
        return t.to(like.device)

    def _random_start(self, xs: Dict[str, Tensor], groups: List[Tuple[Tuple[str, ...], Tensor, Tensor]]) -> Dict[str, Tensor]:
        deltas: Dict[str, Tensor] = {}
        for names, eps, _ in groups:
            if self.norm == "linf":
                for n in names:
                    noise = self._noise(xs[n], "uniform") * 2 - 1
                    deltas[n] = (noise * _bcast(eps, noise)).to(xs[n].dtype)
                continue
            # uniform direction (joint over the group), radius uniform in [0, eps] (as torchattacks);
            # not uniform in volume, which in high dimension starts every run on the sphere, where
            # small projected steps turn slowly towards the best direction
            noise = {n: self._noise(xs[n], "normal") for n in names}
            sq = sum(_flat_sq_norm(noise[n]) for n in names)
            batch = next(iter(xs.values())).shape[0]
            u = self._noise(torch.empty(batch, device=sq.device, dtype=sq.dtype), "uniform")
            scale = torch.where(sq > 0, eps * u / sq.sqrt().clamp_min(1e-30), torch.zeros_like(sq))
            for n in names:
                deltas[n] = (noise[n] * _bcast(scale, noise[n])).to(xs[n].dtype)
        return deltas

    def _project(
        self,
        deltas: Dict[str, Tensor],
        xs: Dict[str, Tensor],
        groups: List[Tuple[Tuple[str, ...], Tensor, Tensor]],
        bounds: Dict[str, Tuple[Tensor, Tensor]],
    ) -> Dict[str, Tensor]:
        """Project onto the budget, then into the bounds (clamping only shrinks |delta|, x inside bounds)."""
        out: Dict[str, Tensor] = {}
        for names, eps, _ in groups:
            if self.norm == "linf":
                for n in names:
                    e = _bcast(eps, deltas[n])
                    out[n] = torch.clamp(deltas[n], -e, e)
            else:
                norm = sum(_flat_sq_norm(deltas[n]) for n in names).sqrt()
                factor = torch.where(norm > eps, eps / norm.clamp_min(1e-30), torch.ones_like(norm))
                for n in names:
                    out[n] = deltas[n] * _bcast(factor, deltas[n])
        for n, (lo, hi) in bounds.items():
            out[n] = torch.clamp(xs[n] + out[n], lo, hi) - xs[n]
        return out

    def _finalise(
        self,
        adv: Dict[str, Tensor],
        xs: Dict[str, Tensor],
        groups: List[Tuple[Tuple[str, ...], Tensor, Tensor]],
        bounds: Dict[str, Tuple[Tensor, Tensor]],
    ) -> Dict[str, Tensor]:
        """Make the *actual* perturbation ``adv - x`` (after rounding) satisfy the budget exactly.

        The projection is done in float64 (float32 on MPS, which has no float64); rounding ``x + d`` back to the input dtype may move a
        coordinate outwards by half an ulp, so such coordinates are moved one ulp towards ``x``:
        then ``|adv_i - x_i| <= |d_i|`` for every coordinate and the budget holds exactly.
        """
        out: Dict[str, Tensor] = {}
        for names, eps, _ in groups:
            wide = _wide(xs[names[0]].device)
            x64 = {n: xs[n].to(wide) for n in names}
            d64 = {n: adv[n].to(wide) - x64[n] for n in names}
            if self.norm == "linf":
                for n in names:
                    e = eps.to(wide).reshape((-1,) + (1,) * (d64[n].dim() - 1))
                    d64[n] = torch.clamp(d64[n], -e, e)
            else:
                norm = sum(d.reshape(d.shape[0], -1).pow(2).sum(1) for d in d64.values()).sqrt()
                e = eps.to(wide)
                factor = torch.where(norm > e, e / norm.clamp_min(1e-300), torch.ones_like(norm))
                for n in names:
                    d64[n] = d64[n] * factor.reshape((-1,) + (1,) * (d64[n].dim() - 1))
            for n in names:
                cand = (x64[n] + d64[n]).to(xs[n].dtype)
                outward = (cand.to(wide) - x64[n]).abs() > d64[n].abs()
                out[n] = torch.where(outward, torch.nextafter(cand, xs[n]), cand)
        for n, (lo, hi) in bounds.items():
            out[n] = torch.clamp(out[n], lo, hi)  # x inside [lo, hi]: clamping only moves towards x
        return out

    def __call__(self, model: Callable[..., Any], inputs: Mapping[str, Tensor], y: Tensor) -> Dict[str, Tensor]:
        where = type(self).__name__
        if torch.is_inference_mode_enabled():
            raise CRMTError(f"{where} needs gradients: call it outside torch.inference_mode() (torch.no_grad() is fine)")
        _check_inputs(inputs)
        names = _resolve_modalities(inputs, self._attacked, where)
        xs: Dict[str, Tensor] = {}
        for n in names:
            x = inputs[n]
            if not x.is_floating_point():
                raise CRMTError(f"{where}: cannot attack modality {n!r} of dtype {x.dtype}; only floating tensors")
            xs[n] = x.detach().clone() if x.is_inference() else x.detach()
        batch = xs[names[0]].shape[0]
        for n, x in xs.items():
            if x.dim() == 0 or x.shape[0] != batch:
                raise CRMTError(f"{where}: modality {n!r} has shape {tuple(x.shape)}, expected batch size {batch} first")
        if not isinstance(y, Tensor) or y.shape[0] != batch:
            raise CRMTError(f"{where}: y must be a tensor with batch size {batch} first, found {getattr(y, 'shape', type(y))}")
        y = y.detach().to(xs[names[0]].device)
        labels = y if (y.dim() == 1 and not y.is_floating_point() and not y.is_complex()) else None
        groups = self._groups(names, xs[names[0]])
        bounds = self._bounds_for(names, inputs)
        fixed = {k: v for k, v in inputs.items() if k not in xs}
        # what the model sees for the fixed modalities (inference-mode tensors cannot enter autograd)
        held = {k: (v.clone() if isinstance(v, Tensor) and v.is_inference() else v) for k, v in inputs.items()}

        def evaluate(deltas: Dict[str, Tensor], need_grad: bool) -> Tuple[Tensor, Tensor, Optional[Dict[str, Tensor]]]:
            if need_grad:
                deltas = {n: d.detach().requires_grad_(True) for n, d in deltas.items()}
            with torch.set_grad_enabled(need_grad):  # also inside a caller's torch.no_grad()
                current = dict(held)
                for n in names:
                    current[n] = xs[n] + deltas[n]
                logits = logits_of(model, current)
                loss = self.loss(logits, y)
                if not isinstance(loss, Tensor) or loss.shape != (batch,):
                    raise CRMTError(
                        f"{where}: the loss must return one value per sample, shape ({batch},), found "
                        f"{getattr(loss, 'shape', type(loss).__name__)}; use reduction='none'"
                    )
                grads = None
                if need_grad:
                    grads = dict(zip(names, torch.autograd.grad(loss.sum(), [deltas[n] for n in names], allow_unused=True)))
                    grads = {n: (g if g is not None else torch.zeros_like(xs[n])) for n, g in grads.items()}
            wrong = logits.detach().argmax(dim=1) != labels if labels is not None else torch.zeros(batch, dtype=torch.bool, device=loss.device)
            return loss.detach(), wrong, grads

        best: Optional[Dict[str, Tensor]] = None
        best_loss = best_wrong = None

        def consider(deltas: Dict[str, Tensor], loss: Tensor, wrong: Tensor) -> None:
            nonlocal best, best_loss, best_wrong
            if best is None:
                best = {n: d.detach().clone() for n, d in deltas.items()}
                best_loss, best_wrong = loss.clone(), wrong.clone()
                return
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            for n in names:
                mask = better.reshape((-1,) + (1,) * (best[n].dim() - 1))
                best[n] = torch.where(mask, deltas[n].detach(), best[n])
            best_loss = torch.where(better, loss, best_loss)
            best_wrong = torch.where(better, wrong, best_wrong)

        with ModeGuard(model, self.eval_mode):
            for _ in range(self.restarts):
                if self.random_start:
                    deltas = self._project(self._random_start(xs, groups), xs, groups, bounds)
                else:
                    deltas = {n: torch.zeros_like(xs[n]) for n in names}
                for _ in range(self.steps):
                    loss, wrong, grads = evaluate(deltas, need_grad=True)
                    if self.keep_best:
                        consider(deltas, loss, wrong)
                    assert grads is not None
                    deltas = self._project(self._step(deltas, grads, groups), xs, groups, bounds)
                if self.keep_best or self.restarts > 1:
                    loss, wrong, _ = evaluate(deltas, need_grad=False)
                    consider(deltas, loss, wrong)
                else:
                    best = deltas
        assert best is not None
        adv = {n: (xs[n] + best[n]).detach() for n in names}
        adv = self._finalise(adv, xs, groups, bounds)
        result: Dict[str, Tensor] = {}
        for key, value in inputs.items():
            result[key] = adv[key] if key in adv else fixed[key]
        return result

    def _step(
        self,
        deltas: Dict[str, Tensor],
        grads: Dict[str, Tensor],
        groups: List[Tuple[Tuple[str, ...], Tensor, Tensor]],
    ) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for names, _eps, step in groups:
            if self.norm == "linf":
                for n in names:
                    out[n] = deltas[n] + _bcast(step, grads[n]) * grads[n].sign()
                continue
            gnorm = sum(_flat_sq_norm(grads[n]) for n in names).sqrt()
            # safe normalisation: a sample whose gradient is exactly zero (or underflows) does not move
            scale = torch.where(gnorm > 0, step / gnorm.clamp_min(1e-30), torch.zeros_like(gnorm))
            for n in names:
                out[n] = deltas[n] + grads[n] * _bcast(scale, grads[n])
        return out


class FGM(PGD):
    """Fast gradient method: one step of the full budget from the clean point (no random start).

    l2: ``delta = eps * g / ||g||`` (joint norm over the attacked modalities, or per modality with
    per-modality budgets); linf: ``delta = eps * sign(g)`` (FGSM). A zero gradient gives a zero step.

    Example::

        >>> adv = FGM(eps=0.2, modalities="image")(model, inputs, y)
        >>> FGM(eps={"audio": 0.1, "image": 0.3}, norm="linf")

    Same arguments as :class:`PGD` except the ones fixed by the method (steps, step size, random
    start, restarts, keep_best).
    """

    name = "FGM"

    def __init__(
        self,
        eps: Union[Number, Mapping[str, Number]],
        *,
        norm: str = "l2",
        modalities: Optional[Union[str, Sequence[str]]] = None,
        bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
        loss: Optional[LossFn] = None,
        eval_mode: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        step = dict(eps) if isinstance(eps, Mapping) else eps
        super().__init__(
            eps, norm=norm, modalities=modalities, steps=1, step_size=step, random_start=False,
            restarts=1, bounds=bounds, loss=loss, generator=None, eval_mode=eval_mode, keep_best=False,
        )  # fmt: skip
        self._config = dict(eps=eps, norm=norm, modalities=modalities, bounds=bounds, loss=loss,
                            eval_mode=eval_mode, generator=generator)  # fmt: skip

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._config.items() if k not in ("loss", "generator"))
        return f"FGM({shown})"


# --------------------------------------------------------------------------------------------------
# missing modality


def drop_modality(
    inputs: Mapping[str, Tensor],
    modalities: Union[str, Iterable[str]],
    fill: Optional[Union[Number, Tensor, Mapping[str, Union[Number, Tensor]]]] = None,
) -> Dict[str, Tensor]:
    """Replace modalities by zeros or by a fill value (e.g. the training mean): the missing-modality test.

    Example::

        >>> means = modality_means(train_loader)                 # {"audio": (13, 32), "image": (1, 28, 28)}
        >>> x = drop_modality(inputs, "audio", fill=means)       # audio: means["audio"] for every sample
        >>> x["image"] is inputs["image"]
        True
        >>> drop_modality(inputs, ["audio"])["audio"].abs().sum()  # zeros by default
        tensor(0.)

    Args:
        modalities: a name or names to replace.
        fill: ``None`` (zeros), a number, a tensor broadcastable to one sample's shape (or the batch
            shape), or a mapping name -> such a value (modalities missing from it get zeros).

    Returns a new dict; untouched modalities are the very same tensors; replaced ones are fresh
    tensors in the input's device and dtype.
    """
    _check_inputs(inputs)
    names = _resolve_modalities(inputs, modalities, "drop_modality")
    out = dict(inputs)
    for n in names:
        x = inputs[n]
        value = fill.get(n) if isinstance(fill, Mapping) else fill
        if value is None:
            out[n] = torch.zeros_like(x)
            continue
        v = torch.as_tensor(value).to(device=x.device, dtype=x.dtype)
        try:
            out[n] = v.expand(x.shape).clone()
        except RuntimeError:
            raise CRMTError(
                f"drop_modality: fill for {n!r} has shape {tuple(v.shape)}, which does not broadcast to the "
                f"modality's tensor {tuple(x.shape)}; give one sample's shape {tuple(x.shape[1:])}"
            ) from None
    return out


def modality_means(
    loader: Iterable[Any],
    modalities: Optional[Union[str, Sequence[str]]] = None,
    *,
    max_batches: Optional[int] = None,
) -> Dict[str, Tensor]:
    """Per-modality mean of one sample over a loader (accumulated in float64), e.g. the training mean.

    Example::

        >>> means = modality_means(train_loader)     # loader yields (inputs_dict, y)
        >>> means["image"].shape                     # one sample's shape
        torch.Size([1, 28, 28])

    Returns ``{name: tensor}`` in each modality's dtype and device, ready for :func:`drop_modality`.
    """
    sums: Dict[str, Tensor] = {}
    dtypes: Dict[str, torch.dtype] = {}
    count = 0
    names: Optional[Tuple[str, ...]] = None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        _check_inputs(inputs)
        if names is None:
            names = _resolve_modalities(inputs, modalities, "modality_means")
        for n in names:
            if n not in inputs:
                raise CRMTError(f"modality_means: batch {i} lacks modality {n!r}; found {list(inputs)}")
            x = inputs[n]
            s = x.detach().to(torch.float64).sum(dim=0)
            if n in sums:
                if sums[n].shape != s.shape:
                    raise CRMTError(
                        f"modality_means: modality {n!r} changes sample shape from {tuple(sums[n].shape)} "
                        f"to {tuple(s.shape)} in batch {i}"
                    )
                sums[n] = sums[n] + s.to(sums[n].device)
            else:
                sums[n] = s
                dtypes[n] = x.dtype
        count += int(inputs[names[0]].shape[0])
    if count == 0 or names is None:
        raise CRMTError("modality_means: the loader yielded no samples")
    return {n: (sums[n] / count).to(dtypes[n]) for n in names}


# --------------------------------------------------------------------------------------------------
# single-tensor adapter for third-party attack libraries


class ModalityAdapter(nn.Module):
    """One modality of a multi-modal model as a single-tensor module, the other modalities held fixed.

    Lets single-input attack libraries (torchattacks, ART, ...) attack one modality::

        >>> adapter = ModalityAdapter(model, inputs, "image", shape=(1, 28, 28))
        >>> x = adapter.select()                               # (B, 1, 28, 28): the attacked modality
        >>> x_adv = torchattacks.PGDL2(adapter, eps=1.0, alpha=0.2, steps=10)(x, y)
        >>> adv_inputs = adapter.merge(x_adv)                  # full dict, image replaced
        >>> adapter(x_adv).shape                               # logits
        torch.Size([B, K])

    Args:
        model: callable on the dict of tensors returning logits or an object with ``.logits``.
        inputs: the batch; every other modality is held at these values (same batch order).
        modality: the name of the modality the adapter exposes.
        shape: optional per-sample shape of the exposed tensor (e.g. ``(1, H, W)`` so that libraries
            expecting 4-D images work with 2-D features); reshaped back before the model sees it.

    Caveat: torchattacks assumes inputs in [0, 1] and clamps to [0, 1] internally (and refuses
    inputs outside it); compare it with :class:`PGD` only on data inside [0, 1], or give
    ``PGD(..., bounds={name: (0, 1)})``. torchattacks also switches the adapter's model to eval
    mode and back via ``.train()``, which does not restore per-submodule flags exactly.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        inputs: Mapping[str, Tensor],
        modality: str,
        shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        _check_inputs(inputs)
        (name,) = _resolve_modalities(inputs, [modality], "ModalityAdapter")
        if isinstance(model, nn.Module):
            self.model = model
        else:
            object.__setattr__(self, "model", model)
        self.modality = name
        self._inputs = dict(inputs)  # held as given: merge() returns the very same tensors
        self._sample_shape = tuple(inputs[name].shape[1:])
        self._shape = tuple(shape) if shape is not None else self._sample_shape
        if math.prod(self._shape) != math.prod(self._sample_shape):
            raise CRMTError(
                f"ModalityAdapter: shape {self._shape} has {math.prod(self._shape)} elements per sample, "
                f"modality {name!r} has {math.prod(self._sample_shape)} (shape {self._sample_shape})"
            )

    def select(self) -> Tensor:
        """The exposed modality of the held batch, shape ``(B, *shape)``."""
        x = self._inputs[self.modality]
        return x.reshape((x.shape[0],) + self._shape)

    def merge(self, x: Tensor) -> Dict[str, Tensor]:
        """The full inputs dict with the exposed modality replaced by ``x`` (``(B, *shape)``)."""
        batch = self._inputs[self.modality].shape[0]
        if x.shape[0] != batch or tuple(x.shape[1:]) != self._shape:
            raise CRMTError(
                f"ModalityAdapter: expected a tensor of shape {(batch,) + self._shape} for modality "
                f"{self.modality!r}, found {tuple(x.shape)} (the other modalities are held for batch size {batch})"
            )
        out = dict(self._inputs)
        out[self.modality] = x.reshape((batch,) + self._sample_shape)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model, self.merge(x))

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, shape={self._shape}, held={sorted(k for k in self._inputs if k != self.modality)}"
