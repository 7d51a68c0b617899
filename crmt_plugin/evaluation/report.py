"""The modality-preference diagnosis: :func:`modality_report`."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._runtime import call_model, output_logits
from ..attacks import Attack, drop_modality
from ..errors import CRMTError
from .results import ModalityReport
from .runner import PRESETS, Bounds, Fill, ModelCall, Session, default_template

__all__ = ["modality_report"]


def _integration_summary(model: Any, modalities: Sequence[str]) -> Dict[str, Optional[float]]:
    weights = getattr(model, "integration_weights", None)
    out: Dict[str, Optional[float]] = {m: None for m in modalities}
    if not callable(weights):
        return out
    with torch.no_grad():
        w = weights()
    if isinstance(w, Mapping):
        for m in modalities:
            if m in w:
                out[m] = float(torch.as_tensor(w[m]).double().mean())
    elif isinstance(w, Tensor) and w.dim() == 2:
        names = tuple(getattr(model, "modalities", ()))
        if len(names) == w.shape[0]:
            for i, m in enumerate(names):
                if m in out:
                    out[m] = float(w[i].double().mean())
    return out


def modality_report(
    model: Callable[..., Any],
    loader: Iterable[Any],
    *,
    radius: float = 1.0,
    attack: Union[None, str, Attack] = None,
    lipschitz: Any = None,
    fill: Fill = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: Optional[int] = 0,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
    progress: bool = False,
    bounds: Bounds = None,
    call: Optional[ModelCall] = None,
) -> ModalityReport:
    """Which modality does the model prefer, and where is it fragile? One pass over the loader.

    Example::

        report = modality_report(crmt, test_loader, radius=1.0, lipschitz=lip, bounds=splits.bounds)
        report.preferred, report.weak_spot          # ('audio', 'audio')
        print(report)

    Args:
        radius: l2 budget of the uni-modal attacks.
        attack: template run on each modality alone with ``eps=radius``: ``None`` / ``"strong"``
            (default, :func:`~crmt_plugin.attacks.strong_attack`), ``"fast"`` (PGD-10, weaker) or
            any attack object.
        bounds: valid input ranges for the preset attacks (attack objects carry their own).
        call: how to call the model, ``call(model, inputs) -> output``, as in :func:`evaluate_robustness`.
        lipschitz: adds the mean per-modality certified radius (models with ``certify``).
        fill: missing-modality fill (e.g. training means); zeros are always reported.
        others: as in :func:`evaluate_robustness`.

    For a ``CRMTWrapper`` the uni-modal margins and accuracies come from ``out.unimodal`` and the
    integration weights from ``integration_weights()``; for plain models those entries are ``None``
    and the preference is read from the missing-modality accuracies alone.
    """
    radius = float(radius)
    if attack is None or isinstance(attack, str):
        template = default_template(attack or "strong", radius, bounds)
    else:
        template = attack
    if not isinstance(template, Attack):
        raise CRMTError(f"attack must be an attack object (PGD, FGM, Square, WorstCase, ...) or a preset name "
                        f"{sorted(PRESETS)}, found {type(template).__name__}")
    if lipschitz is not None and not callable(getattr(model, "certify", None)):
        raise CRMTError(
            f"certified radii need a model with `certify` (a CRMTWrapper); found {type(model).__name__}"
        )
    session = Session(model, device=device, seed=seed, call=call, prepare_batch=prepare_batch,
                      max_batches=max_batches, progress=progress, where="modality_report")
    sums: Dict[str, Dict[str, float]] = {}
    n = 0
    clean = 0
    sound: Optional[bool] = None
    modalities: Optional[Tuple[str, ...]] = None
    attacks: Dict[str, Attack] = {}
    has_unimodal = True

    def acc(key: str, m: str, value: Tensor) -> None:
        sums[m][key] = sums[m].get(key, 0.0) + float(value.double().sum())

    with session.guard():
        for inputs, y in session.batches(loader):
            if modalities is None:
                modalities = tuple(k for k, v in inputs.items() if isinstance(v, Tensor))
                sums = {m: {} for m in modalities}
                for m in modalities:
                    attacks[m] = session.template(template, eps=radius, modalities=(m,))
            with torch.no_grad():
                out = call_model(model, inputs, call)
            logits = output_logits(out)
            clean += int((logits.argmax(1) == y).sum())
            unimodal = getattr(out, "unimodal", None)
            has_unimodal = has_unimodal and isinstance(unimodal, Mapping)
            for m in modalities:
                acc("missing_accuracy", m, session.correct(drop_modality(inputs, m), y))
                if fill is not None and m in fill:
                    acc("missing_fill_accuracy", m, session.correct(drop_modality(inputs, m, fill=fill), y))
                acc("attack_accuracy", m, session.correct(attacks[m](model, inputs, y), y))
                if has_unimodal and m in unimodal:  # type: ignore[operator]
                    z = unimodal[m].detach()  # type: ignore[index]
                    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
                    runner_up = z.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
                    acc("unimodal_margin", m, z_y - runner_up)
                    acc("unimodal_accuracy", m, z.argmax(1) == y)
            if lipschitz is not None:
                cert = model.certify(inputs, y, lipschitz=lipschitz)  # type: ignore[attr-defined]
                sound = cert.sound
                for m in modalities:
                    acc("certified_radius", m, cert.radius_per_modality[m])
            n += int(y.shape[0])
    if modalities is None or n == 0:
        raise CRMTError("modality_report: the loader yielded no samples")
    weights = _integration_summary(model, modalities)
    keys = ["missing_accuracy", "missing_fill_accuracy", "attack_accuracy", "unimodal_margin",
            "unimodal_accuracy", "integration_weight", "certified_radius"]  # fmt: skip
    per_modality: Dict[str, Dict[str, Optional[float]]] = {}
    for m in modalities:
        values: Dict[str, Optional[float]] = {}
        for k in keys:
            if k == "integration_weight":
                values[k] = weights[m]
            elif k in sums[m] and not (k.startswith("unimodal") and not has_unimodal):
                values[k] = sums[m][k] / n
            else:
                values[k] = None
        per_modality[m] = values
    # the fill (e.g. the training mean) is the fairer stand-in for a missing modality when given for
    # all; ties: break by a (larger integration weight = more preferred), then by order
    filled = all(per_modality[m]["missing_fill_accuracy"] is not None for m in modalities)
    missing_key = "missing_fill_accuracy" if filled else "missing_accuracy"
    preferred = min(modalities, key=lambda m: (per_modality[m][missing_key], -(weights[m] or 0.0)))
    weak_spot = min(modalities, key=lambda m: per_modality[m]["attack_accuracy"])  # type: ignore[arg-type, return-value]
    return ModalityReport(
        per_modality=per_modality,
        clean_accuracy=clean / n,
        n=n,
        radius=radius,
        attack=template.label,
        preferred=preferred,
        weak_spot=weak_spot,
        sound=sound,
    )
