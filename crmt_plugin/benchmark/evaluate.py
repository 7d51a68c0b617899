"""The benchmark's evaluation: every number on the test split, in the file's raw input units.

For a trained model and an l2 radius r (one joint budget sqrt(sum_m ||eps_m||^2) <= r):

* ``clean``: accuracy;
* ``pgd_joint``: per sample the worst of the strong gradient attacks on all modalities jointly —
  :func:`crmt_plugin.attacks.strong_attack` (APGD-CE, APGD-DLR with restarts, targeted DLR and CW
  runs; ``steps`` and ``restarts`` passed on) when the library has it, else
  :class:`~crmt_plugin.attacks.PGD` with ``steps`` (50) steps and ``restarts`` (2) restarts on
  cross-entropy plus one run on the CW margin (scale-invariant in the logits' ranking, informative
  where cross-entropy saturates);
* ``pgd:<m>``: the same attacks on modality m alone (budget r);
* ``gradient_free``: a query-only attack on the joint budget —
  :class:`crmt_plugin.attacks.Square` when the library has it, else :class:`RandomSearchL2` (an
  l2 random search in the style of Square, ``queries`` forward passes);
* ``worst_joint``: per sample the worst case over *all* of the above (every one of them stays
  inside the joint budget);
* ``missing:<m>``: modality m replaced by its train mean;
* ``certified_empirical`` (``certified_sound``): the fraction of test samples classified correctly
  with certified radius >= r, with empirical Lipschitz constants (with sound encoder bounds from
  :func:`crmt_plugin.bounds.encoder_bounds`; 0 where the bounds refuse an encoder, with the reason in
  ``certified_sound_note``); ``certified_sound:<m>``, the sound curve and the per-modality-budget region:
  :mod:`~crmt_plugin.benchmark.sound_certificates`. Plain
  models are certified through ``CRMTWrapper(..., orthonormal=False)`` (the same logits).
* ``gradient_masking``: ``True`` when the gradient-free attack leaves at least ``masking_margin``
  (3 points) less accuracy than ``pgd_joint`` — the gradient attacks miss errors a blind search
  finds, a sign of masked gradients.
* ``curve``: accuracy vs radius (0, and ``curve_fractions`` x r) per attacked set (``"joint"`` and
  each modality), with the cheaper attack (:func:`crmt_plugin.attacks.fast_attack` when present,
  else PGD ``curve_steps`` steps CE + CW); the point at r itself is the strong attack's.

:func:`find_radius` picks the radius at which the JT models' joint accuracy (fast attack, on the
validation split) is closest to 45 %.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import attacks as attacks_module
from ..errors import CRMTError, warn
from ..wrapper import CRMTWrapper
from .data import BenchmarkData, batch_list, batches
from .models import Standardize
from .sound_certificates import empty_summary, sound_summary

__all__ = ["EvalConfig", "RandomSearchL2", "certifiable_copy", "cw_loss", "evaluate", "find_radius", "strong_attacks",
           "fast_attacks", "gradient_free_attack", "mean_robust"]

Inputs = Dict[str, Tensor]


@dataclass
class EvalConfig:
    """Evaluation settings (defaults in brackets): steps [None], restarts [None] of the strong attack
    (None: those of :func:`crmt_plugin.attacks.strong_attack`'s default preset);
    queries [1000] of the gradient-free attack; curve_steps [20] of the curve attack; curve_fractions
    [(0.5, 1.5, 2.0)] of the radius; masking_margin [0.03]; batch_size [500]; max_test [None: all]
    test samples attacked."""

    steps: Optional[int] = None
    restarts: Optional[int] = None
    queries: int = 1000
    curve_steps: int = 20
    curve_fractions: Tuple[float, ...] = (0.5, 1.5, 2.0)
    masking_margin: float = 0.03
    batch_size: int = 500
    max_test: Optional[int] = None
    sound: bool = True


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin ``max_{k != y} z_k - z_y`` per sample (B,): maximised, it flips the prediction."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


class RandomSearchL2:
    """A gradient-free l2 attack on a joint budget (a simplified Square-l2): start on the sphere of
    radius ``eps`` along a random direction; each query redraws a random block of coordinates
    (a fraction ``p`` of all, decaying from 0.1 to 0.005), rescales to the sphere and keeps the
    proposal per sample when the CW margin falls. Stops per sample once misclassified.

    Call: ``attack(model, inputs, y) -> adv inputs`` (every modality perturbed unless
    ``modalities`` names some).

    Example:

        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> model = lambda a, b: net(torch.cat([a, b], 1))
        >>> x = {"a": torch.randn(5, 2), "b": torch.randn(5, 2)}
        >>> attack = RandomSearchL2(0.5, queries=20, generator=torch.Generator().manual_seed(0))
        >>> adv = attack(model, x, torch.zeros(5, dtype=torch.long))
        >>> bool((((adv["a"] - x["a"]) ** 2).sum(1) + ((adv["b"] - x["b"]) ** 2).sum(1)).sqrt().max() <= 0.5 + 1e-5)
        True
    """

    def __init__(self, eps: float, *, queries: int = 1000, modalities: Optional[Sequence[str]] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise CRMTError(f"RandomSearchL2: eps must be a finite number >= 0, found {eps!r}")
        if int(queries) < 1:
            raise CRMTError(f"RandomSearchL2: queries must be >= 1, found {queries!r}")
        self.eps, self.queries, self.generator = float(eps), int(queries), generator
        self.modalities = tuple(modalities) if modalities is not None else None

    @torch.no_grad()
    def __call__(self, model: Callable[..., Tensor], inputs: Mapping[str, Tensor], y: Tensor) -> Inputs:
        names = self.modalities or tuple(inputs)
        flat = torch.cat([inputs[n].flatten(1) for n in names], 1)
        b, d = flat.shape
        sizes = [inputs[n][0].numel() for n in names]

        def unpack(delta: Tensor) -> Inputs:
            out = dict(inputs)
            for n, part in zip(names, delta.split(sizes, dim=1)):
                out[n] = inputs[n] + part.view_as(inputs[n])
            return out

        def noise(shape) -> Tensor:
            return torch.randn(shape, generator=self.generator).to(flat)

        def sphere(delta: Tensor) -> Tensor:
            return delta * (self.eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12))

        delta = sphere(noise((b, d)))
        best = cw_loss(model(**unpack(delta)), y)
        for q in range(self.queries - 1):
            active = best <= 0
            if not bool(active.any()):
                break
            p = max(0.005, 0.1 * (1 - q / max(self.queries, 1)))
            k = max(1, int(round(p * d)))
            mask = torch.zeros(b, d, dtype=torch.bool)
            cols = torch.rand(b, d, generator=self.generator).topk(k, dim=1).indices
            mask.scatter_(1, cols, True)
            mask = mask.to(flat.device)
            proposal = torch.where(mask, noise((b, d)) * delta.norm(dim=1, keepdim=True) / math.sqrt(d) * 3, delta)
            proposal = sphere(proposal)
            value = cw_loss(model(**unpack(proposal)), y)
            better = active & (value > best)
            delta = torch.where(better[:, None], proposal, delta)
            best = torch.where(better, value, best)
        return unpack(delta)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def strong_attacks(radius: float, modalities: Optional[Sequence[str]], cfg: EvalConfig, seed: int) -> List[Any]:
    """The strong gradient attacks at ``radius`` on ``modalities`` (None: all jointly)."""
    mods = tuple(modalities) if modalities is not None else None
    if hasattr(attacks_module, "strong_attack"):
        return [attacks_module.strong_attack(radius, norm="l2", modalities=mods, generator=_gen(seed),
                                             steps=cfg.steps, restarts=cfg.restarts)]
    steps, restarts = cfg.steps or 50, cfg.restarts or 2
    return [attacks_module.PGD(radius, norm="l2", modalities=mods, steps=steps, restarts=restarts,
                               generator=_gen(seed)),
            attacks_module.PGD(radius, norm="l2", modalities=mods, steps=steps, restarts=1, loss=cw_loss,
                               generator=_gen(seed + 1))]


def fast_attacks(radius: float, modalities: Optional[Sequence[str]], cfg: EvalConfig, seed: int) -> List[Any]:
    """The cheaper attacks of the curves and the radius search."""
    mods = tuple(modalities) if modalities is not None else None
    if hasattr(attacks_module, "fast_attack"):
        return [attacks_module.fast_attack(radius, norm="l2", modalities=mods, generator=_gen(seed))]
    return [attacks_module.PGD(radius, norm="l2", modalities=mods, steps=cfg.curve_steps, generator=_gen(seed)),
            attacks_module.PGD(radius, norm="l2", modalities=mods, steps=cfg.curve_steps, loss=cw_loss,
                               generator=_gen(seed + 1))]


def gradient_free_attack(radius: float, cfg: EvalConfig, seed: int) -> Any:
    if hasattr(attacks_module, "Square"):
        return attacks_module.Square(radius, norm="l2", queries=cfg.queries, generator=_gen(seed))
    return RandomSearchL2(radius, queries=cfg.queries, generator=_gen(seed))


def _correct(model: nn.Module, inputs: Inputs, y: Tensor, attack: Any, batch_size: int) -> Tensor:
    """(N,) bool: still correct after ``attack`` (None: clean)."""
    out = []
    for xb, yb in batches(inputs, y, batch_size):
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            out.append(model(**xb).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _all_correct(model: nn.Module, inputs: Inputs, y: Tensor, attacks: Sequence[Any], batch_size: int) -> Tensor:
    result = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    for attack in attacks:
        result &= _correct(model, inputs, y, attack, batch_size)
    return result


def _declare_standardize() -> Any:
    from .. import bounds

    if hasattr(bounds, "declare_lipschitz"):
        bounds.declare_lipschitz(Standardize, lambda module, shape: module.lipschitz())
    return bounds


def certifiable_copy(model: nn.Module, head: str = "fusion", modalities: Optional[Mapping[str, int]] = None
                     ) -> CRMTWrapper:
    """A plain late-fusion model, certifiable exactly as CRMT certifies its own head: a deep copy
    wrapped with ``orthonormal=False`` (unit-norm rows, their norms as a: the same logits).
    ``modalities`` defaults to ``model.feature_dims``. The model itself is untouched."""
    dims = modalities if modalities is not None else model.feature_dims
    return CRMTWrapper(copy.deepcopy(model), head=head, modalities=dims, orthonormal=False)


def _certified(trained: Any, data: BenchmarkData, inputs: Inputs, y: Tensor, radius: float,
               sound: bool, head: str = "fusion") -> Tuple[float, Optional[Dict[str, Any]], Optional[str]]:
    """(empirical certified accuracy, the sound entries of :func:`~.sound_certificates.sound_summary` or None,
    why the sound ones are None)."""
    model = trained.model
    if trained.crmt is not None:
        wrapper, lip = trained.crmt, trained.lipschitz
    else:
        wrapper = certifiable_copy(model, head)
        train_x, train_y = data.part("train")
        device = y.device
        lip = wrapper.estimate_lipschitz(batch_list({n: t.to(device) for n, t in train_x.items()},
                                                    train_y.to(device)))
    radii = []
    for xb, yb in batches(inputs, y, 1000):
        radii.append(wrapper.certify(xb, yb, lipschitz=lip).radius)
    empirical = float((torch.cat(radii) >= radius).double().mean())
    if not sound:
        return empirical, None, "not computed"
    try:
        bounds = _declare_standardize()
        encoders = getattr(wrapper.model, "encoders", None)
        if encoders is None:
            return empirical, None, "the model has no `encoders` mapping to bound"
        sound_lip = bounds.encoder_bounds(encoders, data.sample_shapes())
        return empirical, sound_summary(wrapper, sound_lip, inputs, y, radius), None
    except (CRMTError, AttributeError, NotImplementedError) as exc:
        return empirical, None, str(exc).splitlines()[0][:200]


def mean_robust(row: Mapping[str, Any], modalities: Sequence[str]) -> float:
    """Mean of ``worst_joint``, ``pgd:<m>`` and ``missing:<m>`` over the modalities."""
    keys = ["worst_joint"] + [f"pgd:{m}" for m in modalities] + [f"missing:{m}" for m in modalities]
    return float(sum(row[k] for k in keys) / len(keys))


def evaluate(trained: Any, data: BenchmarkData, radius: float, cfg: EvalConfig, *, seed: int = 0,
             device: torch.device = torch.device("cpu"), head: str = "fusion") -> Dict[str, Any]:
    """The row of ``results.json`` for one trained model (see the module docstring).

    ``trained``: a :class:`~crmt_plugin.benchmark.recipes.Trained` (``model`` plain, called as
    ``model(**inputs)``; ``crmt`` and ``lipschitz`` for CRMT models); ``head``: the dotted path of the
    plain model's fusion ``nn.Linear`` (to certify plain models)."""
    started, cpu_started = time.time(), time.process_time()
    model = trained.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    inputs, y = data.part("test")
    if cfg.max_test is not None:
        inputs, y = {n: t[:cfg.max_test] for n, t in inputs.items()}, y[:cfg.max_test]
    inputs, y = {n: t.to(device) for n, t in inputs.items()}, y.to(device)
    mods = data.modalities
    bs = cfg.batch_size
    clean = _correct(model, inputs, y, None, bs)
    joint = _all_correct(model, inputs, y, strong_attacks(radius, None, cfg, seed), bs)
    per = {m: _all_correct(model, inputs, y, strong_attacks(radius, (m,), cfg, seed + 10 * (i + 1)), bs)
           for i, m in enumerate(mods)}
    free = _correct(model, inputs, y, gradient_free_attack(radius, cfg, seed + 99), bs)
    worst = clean & joint & free
    for c in per.values():
        worst &= c
    acc = lambda c: float(c.double().mean()) if c.numel() else float("nan")  # noqa: E731
    row: Dict[str, Any] = {"method": trained.method, "seed": int(trained.seed), "clean": acc(clean & True),
                           "pgd_joint": acc(joint & clean), "worst_joint": acc(worst)}
    for m in mods:
        row[f"pgd:{m}"] = acc(per[m] & clean)
    means = data.train_mean()
    for m in mods:
        filled = dict(inputs)
        filled[m] = means[m].to(device).expand_as(inputs[m])
        row[f"missing:{m}"] = acc(_correct(model, filled, y, None, bs))
    row["gradient_free"] = acc(free & clean)
    row["gradient_masking"] = bool(row["gradient_free"] <= row["pgd_joint"] - cfg.masking_margin)
    empirical, sound, why = _certified(trained, data, inputs, y, radius, cfg.sound, head)
    row["certified_empirical"] = empirical
    row.update(sound if sound is not None else empty_summary(mods))  # certified_sound(:<m>): 0 without a bound
    if why is not None:
        row["certified_sound_note"] = why
    row["mean_robust"] = mean_robust(row, mods)
    curve: Dict[str, List[List[float]]] = {}
    for i, subset in enumerate([None] + [(m,) for m in mods]):
        key = "joint" if subset is None else subset[0]
        strong_value = row["pgd_joint"] if subset is None else row[f"pgd:{subset[0]}"]
        points = [[0.0, row["clean"]], [float(radius), strong_value]]
        for f in cfg.curve_fractions:
            r = float(radius) * f
            c = _all_correct(model, inputs, y, fast_attacks(r, subset, cfg, seed + 1000 + i), bs) & clean
            points.append([r, acc(c)])
        curve[key] = sorted(points)
    row["curve"] = curve
    row["attacks"] = {"strong": [repr(a) for a in strong_attacks(radius, None, cfg, seed)],
                      "gradient_free": repr(gradient_free_attack(radius, cfg, seed))[:300]}
    row["test_samples"] = int(y.shape[0])
    row["val_accuracy"] = float(trained.best_val)
    row["best_epoch"] = int(trained.best_epoch)
    history = getattr(trained, "history", None) or []
    if 1 <= trained.best_epoch <= len(history) and "val_certified_sound" in history[trained.best_epoch - 1]:
        # lip-jt / crmt-lip keep the epoch with the best validation sound certified accuracy (lipschitz_models)
        kept = history[trained.best_epoch - 1]
        row["val_accuracy"] = float(kept["val_accuracy"])
        row["val_certified_sound"] = float(kept["val_certified_sound"])
    if getattr(trained, "selection", None) is not None:
        row["selection"] = trained.selection
        row["rho"] = trained.selection["rho"]
    schedule = getattr(trained, "schedule", None)
    if schedule is not None:
        row["schedule"] = {"batch_size": schedule.batch_size, "steps_per_epoch": schedule.steps_per_epoch,
                           "epochs": schedule.epochs, "steps": schedule.steps}
    row["train_seconds"] = float(trained.train_seconds)
    row["train_cpu_seconds"] = float(getattr(trained, "train_cpu_seconds", 0.0))
    row["eval_seconds"] = time.time() - started
    row["eval_cpu_seconds"] = time.process_time() - cpu_started
    if trained.step2 is not None:
        row["step2"] = trained.step2
    if getattr(trained, "missing_fill_modalities", None) is not None:
        row["missing_fill_modalities"] = list(trained.missing_fill_modalities)
    return row


def _median_norm(inputs: Inputs, means: Mapping[str, Tensor]) -> float:
    sq = sum(((inputs[n] - means[n].to(inputs[n])) ** 2).flatten(1).sum(1) for n in inputs)
    return float(sq.sqrt().median())


def find_radius(models: Sequence[nn.Module], data: BenchmarkData, cfg: EvalConfig, *, target: float = 0.45,
                seed: int = 0, device: torch.device = torch.device("cpu"), iterations: int = 6,
                max_samples: int = 500) -> Tuple[float, List[Tuple[float, float]]]:
    """The l2 radius at which the models' mean joint accuracy (fast attack, validation split) is
    closest to ``target``: a doubling/halving search for a bracket from 5 % of the median distance of
    a sample to the train mean, then ``iterations`` log-space bisection steps. Returns
    ``(radius, [(r, accuracy), ...])`` (the radius rounded to 3 significant digits)."""
    inputs, y = data.part("validation")
    inputs = {n: t[:max_samples].to(device) for n, t in inputs.items()}
    y = y[:max_samples].to(device)
    for m in models:
        m.to(device).eval()

    def accuracy_at(r: float) -> float:
        values = [float(_all_correct(m, inputs, y, fast_attacks(r, None, cfg, seed), cfg.batch_size).double().mean())
                  for m in models]
        return sum(values) / len(values)

    tried: List[Tuple[float, float]] = []
    clean = sum(float(_correct(m, inputs, y, None, cfg.batch_size).double().mean()) for m in models) / len(models)
    if clean <= target:
        warn(f"JT's clean validation accuracy {clean:.3f} is already below {target}: radius auto uses a "
             "small radius; pass --radius to choose one")
    r = max(0.05 * _median_norm(inputs, data.train_mean()), 1e-6)
    a = accuracy_at(r)
    tried.append((r, a))
    lo = hi = None
    for _ in range(12):
        if a > target:
            lo = (r, a)
            if hi is not None:
                break
            r *= 2
        else:
            hi = (r, a)
            if lo is not None:
                break
            r /= 2
        a = accuracy_at(r)
        tried.append((r, a))
    if lo is not None and hi is not None:
        lo_r, hi_r = lo[0], hi[0]
        for _ in range(iterations):
            mid = math.sqrt(lo_r * hi_r)
            a = accuracy_at(mid)
            tried.append((mid, a))
            if a > target:
                lo_r = mid
            else:
                hi_r = mid
    best = min(tried, key=lambda t: abs(t[1] - target))[0]
    return float(f"{best:.3g}"), tried
