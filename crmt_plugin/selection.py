"""Choosing the strength of the CRMT regulariser on the user's own validation data.

A fixed ``rho`` chosen on some data sets does not transfer to every other kind of data (docs/method.md,
"Choosing rho on your data"): on some sets the margin term moves accuracy from the joint and the
preferred-modality columns to the weak modality, and with adversarial training it can cost joint
robustness. :func:`select_rho` trains one model per candidate with the user's own loop (a function
``fit(rho) -> model``), scores each on a validation loader, and keeps the most robust one whose clean
accuracy stays within ``clean_tolerance`` of a reference: your own model trained without CRMT when you
pass it (``baseline=``), else the ``rho = 0`` candidate (CRMT without the margin term). With ``baseline``
the selection can always fall back to "CRMT does not help here" and return your model itself; without it
the fallback is ``rho = 0``, which keeps the CRMT head and can cost clean accuracy on its own.

The score of a model on a validation loader (:func:`validation_scores`), every number an accuracy in [0, 1]:

    clean, joint (attack on all modalities, one l2 budget ``radius``), attack:<m> (modality m alone),
    missing:<m> (modality m replaced by ``missing_fill[m]``, when given)
    mean_robust = mean(joint, attack:<m> for every m, missing:<m> for every m)

The attack is :func:`crmt_plugin.attacks.strong_attack` with fewer steps (``steps=20, restarts=1, targets=1``
by default: a validation score ranks candidates, it is not a published number; evaluate the chosen model
with the full strong attack).

Example::

    def fit(rho):                                   # your loop, unchanged but for the rho it is given
        crmt = crmt_plugin.CRMTWrapper(MyModel(), example_inputs=batch)
        ...                                         # train with crmt_plugin.crmt_loss(crmt(x), y, rho=rho)
        return crmt

    def fit_baseline():                             # the same loop without CRMT (optional, recommended)
        ...
        return model

    chosen = crmt_plugin.select_rho(fit, val_loader, radius=1.0, missing_fill=means, baseline=fit_baseline)
    chosen.rho, chosen.model, chosen.table          # the candidates' scores, one dict each
    chosen.baseline_chosen                          # True: CRMT did not help on this data
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import attacks as attacks_module
from ._runtime import ModeGuard, ModelCall, iterate_batches, logits_of
from .errors import CRMTError

__all__ = ["select_rho", "validation_scores", "RhoSelection", "DEFAULT_CANDIDATES", "DEFAULT_CLEAN_TOLERANCE"]

# rho = 0 (the baseline without the margin term), a light and the default strength of crmt_loss
DEFAULT_CANDIDATES: Tuple[float, ...] = (0.0, 0.1, 0.5)
# half a point of validation accuracy: what a candidate may lose against rho = 0 and still be chosen
DEFAULT_CLEAN_TOLERANCE = 0.005


@dataclass
class RhoSelection:
    """What :func:`select_rho` chose and why.

    Attributes:
        rho: the chosen candidate; ``None`` when the ``baseline`` model (your loop without CRMT) was chosen.
        model: what ``fit(rho)`` (or ``baseline()``) returned for it.
        table: one dict per candidate, in the order tried: ``rho`` (``None`` for the baseline, which is
            tried first), the :func:`validation_scores`, and ``eligible`` (clean accuracy within the
            tolerance of the reference).
        reference_clean: the clean accuracy the tolerance is measured from: the baseline's when one is
            given, else the ``rho = 0`` candidate's, else the best candidate's.
    """

    rho: Optional[float]
    model: Any
    table: List[Dict[str, Any]] = field(default_factory=list)
    reference_clean: float = float("nan")

    @property
    def baseline_chosen(self) -> bool:
        """True when no CRMT candidate beat the baseline: CRMT does not help on this data, at this tolerance."""
        return self.rho is None


def _accuracy(correct: List[Tensor]) -> float:
    if not correct:
        return float("nan")
    joined = torch.cat(correct)
    return float(joined.double().mean()) if joined.numel() else float("nan")


def validation_scores(
    model: Any,
    loader: Iterable[Any],
    *,
    radius: float,
    modalities: Optional[Sequence[str]] = None,
    missing_fill: Optional[Mapping[str, Tensor]] = None,
    steps: int = 20,
    restarts: int = 1,
    targets: int = 1,
    generator: Optional[torch.Generator] = None,
    call: Optional[ModelCall] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, float]:
    """Clean, attacked and missing-modality accuracy of ``model`` on ``loader`` (see the module docs).

    The model runs in eval mode; every submodule's ``training`` flag is restored afterwards.

    Args:
        model: called as the attacks call it (``model(inputs)``, or ``model(**inputs)`` when its forward
            takes the modality names), returning (B, K) logits or a CRMT output.
        loader: yields ``(inputs_dict, y)`` (or anything ``prepare_batch`` maps to that).
        radius: the l2 budget of the attacks (the units of the inputs).
        modalities: the modalities to attack and drop (default: every modality of the first batch).
        missing_fill: ``{name: one sample}`` to fill a missing modality with (e.g.
            :func:`crmt_plugin.attacks.modality_means` of the training loader); without it no ``missing:<m>``.
        steps, restarts, targets: of :func:`crmt_plugin.attacks.strong_attack`.

    Returns ``{"clean", "joint", "attack:<m>", "missing:<m>", "mean_robust"}``.

    Example:

        >>> net = torch.nn.Linear(3, 2)
        >>> model = lambda inputs: net(torch.cat([inputs["a"], inputs["b"]], 1))
        >>> loader = [({"a": torch.randn(8, 2), "b": torch.randn(8, 1)}, torch.randint(0, 2, (8,)))]
        >>> sorted(validation_scores(model, loader, radius=0.1, steps=2))
        ['attack:a', 'attack:b', 'clean', 'joint', 'mean_robust']
    """
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise CRMTError(f"validation_scores: radius must be a finite number > 0, found {radius!r}")
    clean: List[Tensor] = []
    joint: List[Tensor] = []
    per: Dict[str, List[Tensor]] = {}
    missing: Dict[str, List[Tensor]] = {}
    names: Optional[Tuple[str, ...]] = None
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)) if generator is not None else 0
    with ModeGuard(model):
        for inputs, y in iterate_batches(loader, prepare_batch, max_batches=max_batches):
            if names is None:
                names = tuple(modalities) if modalities is not None else tuple(inputs)
                per = {n: [] for n in names}
                missing = {n: [] for n in names if missing_fill is not None and n in missing_fill}
            with torch.no_grad():
                ok = logits_of(model, inputs, call).argmax(-1) == y
            clean.append(ok)

            def attacked(subset: Optional[Tuple[str, ...]], offset: int) -> Tensor:
                attack = attacks_module.strong_attack(
                    radius, modalities=subset, steps=steps, restarts=restarts, targets=targets, call=call,
                    generator=torch.Generator(device="cpu").manual_seed(seed + offset))
                adversarial = attack(model, inputs, y)
                with torch.no_grad():
                    return (logits_of(model, adversarial, call).argmax(-1) == y) & ok

            joint.append(attacked(None, 0))
            for i, n in enumerate(names):
                per[n].append(attacked((n,), i + 1))
            for n in missing:
                filled = dict(inputs)
                filled[n] = missing_fill[n].to(inputs[n]).expand_as(inputs[n])
                with torch.no_grad():
                    missing[n].append(logits_of(model, filled, call).argmax(-1) == y)
    if names is None:
        raise CRMTError("validation_scores: the loader yielded no batch")
    scores = {"clean": _accuracy(clean), "joint": _accuracy(joint)}
    scores.update({f"attack:{n}": _accuracy(v) for n, v in per.items()})
    scores.update({f"missing:{n}": _accuracy(v) for n, v in missing.items()})
    robust = [scores["joint"]] + [scores[f"attack:{n}"] for n in per] + [scores[f"missing:{n}"] for n in missing]
    scores["mean_robust"] = float(sum(robust) / len(robust))
    return scores


def select_rho(
    fit: Callable[[float], Any],
    val_loader: Iterable[Any],
    *,
    radius: float,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    clean_tolerance: float = DEFAULT_CLEAN_TOLERANCE,
    score: Optional[Callable[[Any], Mapping[str, float]]] = None,
    baseline: Optional[Callable[[], Any]] = None,
    **score_kwargs: Any,
) -> RhoSelection:
    """Train one model per ``rho`` with ``fit(rho)``, keep the most robust one that stays accurate.

    Rule: reference = the clean validation accuracy of the ``baseline`` model when one is given, else of
    the ``rho = 0`` candidate (or the best clean accuracy when 0 is not a candidate); eligible = the
    baseline and the candidates with clean >= reference - clean_tolerance; chosen = the eligible one with
    the highest ``mean_robust`` (ties: the baseline, then the smaller rho).

    ``rho = 0`` is CRMT without the margin term, not your model: it keeps the CRMT head (and whatever
    else your ``fit`` adds, e.g. step 2), which can cost clean accuracy on its own. Pass ``baseline``
    (your loop without CRMT, ``baseline() -> model``) to measure the tolerance from your model and to let
    the selection answer "CRMT does not help here" with your model itself (``rho`` is then ``None``).

    Args:
        fit: your training loop as a function of rho (called once per candidate, in order); returns the
            model to score (a :class:`~crmt_plugin.CRMTWrapper`, an exported model, anything the attacks call).
        val_loader: the validation batches (never the test split).
        radius: the l2 budget of the validation attacks.
        candidates: the rho values to try (>= 0; include 0.0 so that "no margin term" can win).
        clean_tolerance: how much clean validation accuracy a candidate may lose against the reference.
        score: ``score(model) -> {"clean", "mean_robust", ...}`` to replace :func:`validation_scores`.
        baseline: ``baseline() -> model``, your loop without CRMT (called once, before the candidates).
        score_kwargs: passed to :func:`validation_scores` (``missing_fill``, ``steps``, ``call``, ...).

    Cost: ``len(candidates)`` trainings (one more with ``baseline``) plus their validation scores; each
    training step costs what a fixed-rho step costs (docs/benchmarks.md).

    Example:

        >>> fits = {0.0: "baseline", 0.5: "crmt"}
        >>> scores = {"baseline": {"clean": 0.90, "mean_robust": 0.40}, "crmt": {"clean": 0.899, "mean_robust": 0.55}}
        >>> chosen = select_rho(fits.get, [], radius=1.0, candidates=(0.0, 0.5), score=scores.get)
        >>> chosen.rho, chosen.model
        (0.5, 'crmt')
        >>> scores["plain"] = {"clean": 0.91, "mean_robust": 0.35}   # your model: 1 point more accurate
        >>> chosen = select_rho(fits.get, [], radius=1.0, candidates=(0.0, 0.5), score=scores.get,
        ...                     baseline=lambda: "plain")
        >>> chosen.rho, chosen.model, chosen.baseline_chosen
        (None, 'plain', True)
    """
    values = [float(c) for c in candidates]
    if not values or any(not (math.isfinite(c) and c >= 0) for c in values) or len(set(values)) != len(values):
        raise CRMTError(f"select_rho: candidates must be distinct finite numbers >= 0, found {list(candidates)}; "
                        f"e.g. {DEFAULT_CANDIDATES}")
    if not (math.isfinite(clean_tolerance) and clean_tolerance >= 0):
        raise CRMTError(f"select_rho: clean_tolerance must be a finite number >= 0, found {clean_tolerance!r}")
    table: List[Dict[str, Any]] = []
    models: Dict[Optional[float], Any] = {}
    tries: List[Tuple[Optional[float], Callable[[], Any]]] = [] if baseline is None else [(None, baseline)]
    tries += [(rho, (lambda rho=rho: fit(rho))) for rho in values]
    for rho, train in tries:
        model = train()
        result = dict(score(model) if score is not None else
                      validation_scores(model, val_loader, radius=radius, **score_kwargs))
        for key in ("clean", "mean_robust"):
            if key not in result:
                name = "the baseline" if rho is None else f"rho={rho}"
                raise CRMTError(f"select_rho: the score of {name} lacks {key!r}; found {sorted(result)}")
        table.append({"rho": rho, **{k: float(v) for k, v in result.items()}})
        models[rho] = model
    if baseline is not None:
        reference = table[0]["clean"]
    else:
        reference = next((r["clean"] for r in table if r["rho"] == 0.0), max(r["clean"] for r in table))
    for row in table:
        row["eligible"] = float(row["rho"] is None or row["clean"] >= reference - clean_tolerance - 1e-12)
    eligible = [r for r in table if r["eligible"]] or [max(table, key=lambda r: r["clean"])]
    # ties: the baseline first, then the smaller rho
    best = max(eligible, key=lambda r: (r["mean_robust"], 1.0 if r["rho"] is None else -r["rho"]))
    return RhoSelection(rho=best["rho"], model=models[best["rho"]], table=table, reference_clean=float(reference))
