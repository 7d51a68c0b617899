"""The evaluation runner: :func:`evaluate_robustness`, and the preparation path it shares with
:func:`~crmt_plugin.evaluation.modality_report` (:class:`Session`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._runtime import ModeGuard, iterate_batches, logits_of, module_device, move_batch, non_finite_modalities
from ..attacks import Attack, drop_modality, fast_attack, strong_attack
from ..errors import CRMTError
from .render import default_subsets, subset_name
from .results import RobustnessResult

__all__ = ["evaluate_robustness", "Session", "PRESETS", "default_template"]

Subset = Tuple[str, ...]
Fill = Optional[Mapping[str, Union[float, Tensor]]]
ModelCall = Callable[[Any, Mapping[str, Tensor]], Any]
Bounds = Optional[Mapping[str, Tuple[Any, Any]]]

# name -> preset(eps, bounds=...) accepted as `attacks=` / `attack=`
PRESETS: Dict[str, Callable[..., Attack]] = {"strong": strong_attack, "fast": fast_attack}


def default_template(name: str, eps: float, bounds: Bounds) -> Attack:
    """The preset called ``name`` (``"strong"`` or ``"fast"``) at ``eps`` with ``bounds``."""
    if name not in PRESETS:
        raise CRMTError(f"unknown attack preset {name!r}; known: {sorted(PRESETS)} (or pass attack objects)")
    return PRESETS[name](eps, bounds=dict(bounds) if bounds else None)


class Session:
    """What :func:`evaluate_robustness` and :func:`~crmt_plugin.evaluation.modality_report` share:
    the device, the generator for templates without their own, the model call, and the batches
    (prepared, moved, refused when non-finite), run under :class:`~crmt_plugin._runtime.ModeGuard`.
    """

    def __init__(
        self,
        model: Any,
        *,
        device: Optional[Union[str, torch.device]] = None,
        seed: Optional[int] = 0,
        call: Optional[ModelCall] = None,
        prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
        max_batches: Optional[int] = None,
        progress: bool = False,
        where: str = "evaluate_robustness",
    ) -> None:
        if call is not None and not callable(call):
            raise CRMTError(f"{where}: call must be a callable(model, inputs) -> output, found {type(call).__name__}")
        self.model = model
        self.device = torch.device(device) if device is not None else module_device(model)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.call = call
        self.prepare_batch = prepare_batch
        self.max_batches = max_batches
        self.progress = progress
        self.where = where

    def template(self, attack: Attack, **changes: Any) -> Attack:
        """``attack`` with the session's generator and call where it has none of its own, and ``changes``."""
        if attack.generator is None and self.generator is not None:
            changes.setdefault("generator", self.generator)
        if attack.call is None and self.call is not None:
            changes.setdefault("call", self.call)
        return attack.replace(**changes) if changes else attack

    def batches(self, loader: Iterable[Any]) -> Iterator[Tuple[Dict[str, Tensor], Tensor]]:
        """``(inputs, y)`` on the device. Use inside ``with session.guard():`` (eval mode, every flag restored).

        Raises :class:`CRMTError` naming the modality when an input holds NaN or Inf: in eval mode
        such inputs give NaN logits and an accuracy over them would be meaningless."""
        batches = iterate_batches(loader, self.prepare_batch, progress=self.progress, desc=self.where,
                                  max_batches=self.max_batches)
        for i, (inputs, y) in enumerate(batches):
            inputs, y = move_batch(inputs, y, self.device)
            bad = non_finite_modalities(inputs)
            if bad:
                raise CRMTError(
                    f"{self.where}: batch {i} holds NaN or Inf values in modalities {bad}; an accuracy over "
                    "non-finite inputs means nothing. Clean or drop those samples first (e.g. torch.nan_to_num "
                    "or a mask in prepare_batch)"
                )
            yield inputs, y

    def guard(self) -> ModeGuard:
        """Eval mode for the evaluation; every submodule's ``training`` flag restored afterwards."""
        return ModeGuard(self.model, True)

    def logits(self, inputs: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return logits_of(self.model, inputs, self.call)

    def correct(self, inputs: Mapping[str, Tensor], y: Tensor) -> Tensor:
        return self.logits(inputs).argmax(dim=1) == y


def _as_subsets(subsets: Any) -> List[Subset]:
    return [(s,) if isinstance(s, str) else tuple(s) for s in subsets]


def _can_certify(model: Any) -> bool:
    return callable(getattr(model, "certify", None))


def _templates(attacks: Any, bounds: Bounds, radii: Optional[Sequence[float]]) -> List[Tuple[str, Attack]]:
    if attacks is None:
        return []
    if isinstance(attacks, str):
        if radii is None:  # a preset needs budgets: nothing to sweep without radii
            if attacks not in PRESETS:
                default_template(attacks, 1.0, bounds)  # the error message
            return []
        template = default_template(attacks, 1.0, bounds)
        return [(template.label, template)]
    items = list(attacks.items()) if isinstance(attacks, Mapping) else [(None, a) for a in attacks]
    out: List[Tuple[str, Attack]] = []
    for label, attack in items:
        if isinstance(attack, str):
            attack = default_template(attack, 1.0, bounds)
        if not isinstance(attack, Attack):
            raise CRMTError(
                f"attacks must be attack objects from crmt_plugin.attacks (PGD, FGM, Square, WorstCase, "
                f"strong_attack(...)) used as templates, or a preset name {sorted(PRESETS)}; found "
                f"{type(attack).__name__}; wrap third-party attacks with ModalityAdapter and evaluate them yourself"
            )
        name = label if label is not None else attack.label
        if any(name == n for n, _ in out):
            raise CRMTError(f"two attacks share the label {name!r}; pass a mapping label -> attack to tell them apart")
        out.append((name, attack))
    return out


def evaluate_robustness(
    model: Callable[..., Any],
    loader: Iterable[Any],
    attacks: Union[None, str, Sequence[Attack], Mapping[str, Attack]] = "strong",
    radii: Optional[Sequence[float]] = None,
    *,
    subsets: Optional[Sequence[Union[str, Sequence[str]]]] = None,
    lipschitz: Any = None,
    certified_radii: Optional[Sequence[float]] = None,
    missing: bool = True,
    fill: Fill = None,
    bounds: Bounds = None,
    call: Optional[ModelCall] = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: Optional[int] = 0,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
    progress: bool = False,
) -> RobustnessResult:
    """Accuracy under each attack x attacked modalities x radius, missing modalities, certificates.

    Example::

        result = evaluate_robustness(model, test_loader, radii=[0.5, 1.0, 2.0],   # the strong attack
                                     bounds=splits.bounds, fill=modality_means(train_loader))
        print(result.table("markdown", pivot=True))
        # | attack | modalities | 0.5 | 1 | 2 |
        # |---|---|---|---|---|
        # | strong-l2 | audio | 95.2 | 80.1 | 55.0 |
        quick = evaluate_robustness(model, test_loader, "fast", radii=[1.0])    # PGD-10: weaker

    Args:
        model: callable on a dict of tensors returning logits (B, K) or an object with ``.logits``.
        loader: yields ``(inputs_dict, y)`` (or anything ``prepare_batch`` maps to that).
        attacks: ``"strong"`` (default: :func:`~crmt_plugin.attacks.strong_attack`, the per-sample
            worst case of APGD-CE, APGD-DLR and targeted APGD runs), ``"fast"``
            (:func:`~crmt_plugin.attacks.fast_attack`, PGD-10 with cross-entropy: cheap and
            **weaker**), ``None`` (no attack rows), or attack objects (PGD, FGM, Square, WorstCase,
            ...) used as templates (their settings are kept), or a mapping label -> template.
        radii: budgets to sweep; each template is run with ``eps=r`` (one joint budget over the
            attacked modalities). ``None``: each template runs once with its own ``eps`` (a preset
            name runs nothing without radii).
        subsets: attacked modality sets, e.g. ``["audio", "image", ("audio", "image")]``. Default:
            the template's own ``modalities`` if set, else each modality alone and all together.
        lipschitz: with a model that has ``certify`` (a ``CRMTWrapper``), adds certified accuracy
            rows per radius (joint and per modality): the fraction of samples classified correctly
            with certified radius ``>= r``, with the certificate's ``sound`` flag.
        certified_radii: radii of the certified rows (default: ``radii``; without radii, 0 and the
            templates' budgets). Certificates are cheap: one forward pass per batch for all radii.
        missing: add missing-modality rows (each modality replaced by zeros, and by ``fill``).
        fill: e.g. :func:`~crmt_plugin.attacks.modality_means` of the training loader.
        bounds: valid input ranges ``{name: (lo, hi)}`` for the preset attacks (attack objects
            carry their own).
        call: how to call the model, ``call(model, inputs) -> output`` (e.g.
            ``lambda m, x: m(x["audio"], x["image"])[0]``); given to every template without its own.
        device: where to move the batches; default: the device of the model's first parameter
            (batches stay where they are for models without parameters).
        seed: seeds one ``torch.Generator`` given to every template without its own (reproducible
            random starts); ``None`` uses the global RNG.
        max_batches: stop after this many batches (quick looks).
        progress: a tqdm progress bar over batches (if tqdm is missing: a warning, no bar).

    Raises :class:`~crmt_plugin.CRMTError` naming the modality when a batch holds NaN or Inf.

    Cost per batch: per (template, subset, radius) the attack's cost (``attack.cost``: strong
    preset at most 459 forward+backward passes, fast preset 10), plus a few forward passes.
    """
    if radii is not None:
        radii = [float(r) for r in radii]
        if any(not math.isfinite(r) or r < 0 for r in radii):
            raise CRMTError(f"radii must be finite numbers >= 0, found {radii}")
    templates = _templates(attacks, bounds, radii)
    for label, t in templates:
        if isinstance(t.eps, Tensor):
            raise CRMTError(f"attack {label!r} has per-sample budgets (a tensor eps); the runner needs numbers")
        if radii is not None and isinstance(t.eps, Mapping):
            raise CRMTError(
                f"attack {label!r} has per-modality budgets {dict(t.eps)}; a radius sweep needs one joint "
                "budget: give a number as eps, or radii=None to run it as it is"
            )
    if lipschitz is not None and not _can_certify(model):
        raise CRMTError(
            f"certified accuracy needs a model with a `certify(inputs, y, lipschitz=...)` method (a "
            f"CRMTWrapper); found {type(model).__name__}. Drop `lipschitz` or wrap the model"
        )
    if certified_radii is not None:
        cert_radii = [float(r) for r in certified_radii]
    elif radii is not None:
        cert_radii = list(radii)
    else:
        cert_radii = sorted({0.0} | {float(t.eps) for _, t in templates if not isinstance(t.eps, Mapping)})
    if any(not math.isfinite(r) or r < 0 for r in cert_radii):
        raise CRMTError(f"certified_radii must be finite numbers >= 0, found {cert_radii}")
    session = Session(model, device=device, seed=seed, call=call, prepare_batch=prepare_batch,
                      max_batches=max_batches, progress=progress, where="evaluate_robustness")
    subset_arg = _as_subsets(subsets) if subsets is not None else None

    counts: Dict[Tuple[str, str, float], List[Any]] = {}  # key -> [correct, n, sound]

    def add(attack: str, mods: str, radius: float, correct: Tensor, sound: Optional[bool] = None) -> None:
        entry = counts.setdefault((attack, mods, radius), [0, 0, sound])
        entry[0] += int(correct.sum().item())
        entry[1] += int(correct.numel())

    modalities: Optional[Tuple[str, ...]] = None
    runs: List[Tuple[str, Subset, float, Attack]] = []
    with session.guard():
        for inputs, y in session.batches(loader):
            if modalities is None:
                modalities = tuple(k for k, v in inputs.items() if isinstance(v, Tensor))
                for label, t in templates:
                    if isinstance(t.eps, Mapping):  # per-modality budgets: run as given (radii is None)
                        runs.append((label, tuple(t.eps), math.nan, session.template(t)))
                        continue
                    chosen = subset_arg or ([t.modalities] if t.modalities is not None else default_subsets(modalities))
                    for subset in chosen:
                        unknown = [m for m in subset if m not in modalities]
                        if unknown:
                            raise CRMTError(f"subset {subset} names {unknown}, not in the inputs {list(modalities)}")
                        for r in radii if radii is not None else [float(t.eps)]:
                            runs.append((label, subset, r, session.template(t, eps=r, modalities=subset)))
            all_name = subset_name(modalities)
            add("clean", all_name, 0.0, session.correct(inputs, y))
            for label, subset, r, attack in runs:
                adv = attack(model, inputs, y)
                add(label, subset_name(subset), r, session.correct(adv, y))
            if missing:
                for m in modalities:
                    add("missing (zeros)", m, math.nan, session.correct(drop_modality(inputs, m), y))
                    if fill is not None and m in fill:
                        add("missing (fill)", m, math.nan, session.correct(drop_modality(inputs, m, fill=fill), y))
            if lipschitz is not None:
                cert = model.certify(inputs, y, lipschitz=lipschitz)  # type: ignore[attr-defined]
                correct = cert.correct.to(y.device)
                for r in cert_radii:
                    add("certified", all_name, r, correct & (cert.radius.to(y.device) >= r), cert.sound)
                    for m in modalities:
                        add("certified", m, r, correct & (cert.radius_per_modality[m].to(y.device) >= r), cert.sound)
    if modalities is None:
        raise CRMTError("evaluate_robustness: the loader yielded no batches")
    rows = [
        {"attack": a, "modalities": m, "radius": r, "accuracy": c / n if n else math.nan, "n": n, "sound": s}
        for (a, m, r), (c, n, s) in counts.items()
    ]
    return RobustnessResult(rows=rows, modalities=modalities, attacks={label: repr(t) for label, t in templates})
