"""``crmt-benchmark --select``: each CRMT recipe's rho chosen on the validation split, with the baseline as fallback.

For a CRMT method and a seed, :func:`train_selected` trains the recipe's baseline (``jt`` for ``crmt-jt``,
``pgd-at`` for ``crmt-at``, ``trades`` for ``crmt-trades``, ``mixup`` for ``crmt-mix``: :data:`BASELINE_OF`) and
the recipe once per candidate rho (the same seed, so the candidates differ only by rho), scores each trained model
on the validation split with :func:`crmt_plugin.selection.validation_scores` (clean, a shortened strong attack on
all modalities and on each alone at the run's radius, each modality missing), and keeps the one
:func:`crmt_plugin.selection.select_rho` chooses: the most robust of the baseline and the candidates whose clean
validation accuracy is within the tolerance of the baseline's. When the baseline is chosen the row is the baseline's
model (``rho`` None in ``results.json``): CRMT did not help on that seed's validation split. ``baseline=False``
(``crmt-benchmark --no-select-baseline``) measures the tolerance from ``rho = 0`` instead and never falls back.
The test split is never looked at. The chosen model is then evaluated like every other row.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..errors import CRMTError
from ..selection import DEFAULT_CANDIDATES, DEFAULT_CLEAN_TOLERANCE, select_rho, validation_scores
from .data import BenchmarkData, batch_list
from .recipes import PAIRS, TrainConfig, Trained, train

__all__ = ["SELECTABLE", "BASELINE_OF", "train_selected"]

# the recipes whose rho is a free choice (the paper's recipe is the paper's rho = 2)
SELECTABLE = ("crmt-jt", "crmt-at", "crmt-trades", "crmt-mix")
# each selectable recipe's baseline: the selection's reference and fallback
# (the first pair of PAIRS that has the recipe as its variant: crmt-jt's is jt, not paper-crmt-jt)
BASELINE_OF = {variant: next(b for b, v in PAIRS if v == variant) for variant in SELECTABLE}


def train_selected(method: str, data: BenchmarkData, cfg: TrainConfig, seed: int, radius: float, *,
                   candidates: Sequence[float] = DEFAULT_CANDIDATES,
                   clean_tolerance: float = DEFAULT_CLEAN_TOLERANCE,
                   baseline: Union[bool, Trained] = True, device: torch.device = torch.device("cpu"),
                   epoch_bar: Optional[Callable[[range], Any]] = None, max_val: int = 500) -> Trained:
    """Train ``method`` once per candidate rho (and its baseline, unless ``baseline=False``) and return the chosen
    :class:`Trained`, with ``.selection`` (the candidates' validation scores and the chosen ``rho``, None for the
    baseline) set; a chosen baseline comes back under ``method``'s name. ``baseline`` may be the baseline already
    trained with the same data, config and seed (``crmt-benchmark`` reuses the JT of ``--radius auto``). Methods
    outside :data:`SELECTABLE` train once."""
    if method not in SELECTABLE:
        return train(method, data, cfg, seed, device=device, epoch_bar=epoch_bar)
    val_x, val_y = data.part("validation")
    val_x = {n: t[:max_val].to(device) for n, t in val_x.items()}
    val_y = val_y[:max_val].to(device)
    loader = batch_list(val_x, val_y, 500)
    fill = {n: m.to(device) for n, m in data.train_mean().items()}

    seconds = {"train": 0.0, "score": 0.0}

    def fit(rho: float) -> Trained:
        trained = train(method, data, dataclasses.replace(cfg, rho=float(rho)), seed, device=device,
                        epoch_bar=epoch_bar)
        seconds["train"] += trained.train_seconds
        return trained

    def score(trained: Trained):
        started = time.time()
        result = validation_scores(trained.model, loader, radius=radius, missing_fill=fill,
                                   generator=torch.Generator().manual_seed(seed + 5))
        seconds["score"] += time.time() - started
        return result

    def fit_baseline() -> Trained:
        if isinstance(baseline, Trained):
            if baseline.method != BASELINE_OF[method] or baseline.seed != seed:
                raise CRMTError(f"train_selected: the baseline of {method} seed {seed} is "
                                f"{BASELINE_OF[method]} seed {seed}, found {baseline.method} seed {baseline.seed}; "
                                "pass that model, or baseline=True to train it")
            trained = baseline  # already trained: costs this selection nothing
        else:
            trained = train(BASELINE_OF[method], data, cfg, seed, device=device, epoch_bar=epoch_bar)
            seconds["train"] += trained.train_seconds
        return dataclasses.replace(trained, method=method)

    chosen = select_rho(fit, loader, radius=radius, candidates=candidates, clean_tolerance=clean_tolerance,
                        score=score, baseline=None if baseline is False else fit_baseline)
    trained = chosen.model
    trained.selection = {"rho": chosen.rho, "reference_clean": chosen.reference_clean, "candidates": chosen.table,
                         "clean_tolerance": clean_tolerance, "train_seconds_all": seconds["train"],
                         "score_seconds": seconds["score"]}
    return trained
