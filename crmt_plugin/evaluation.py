"""Robustness evaluation: accuracy under attacks / missing modalities / certificates, tables, plots.

The protocol of spec §5 in one call::

    >>> from crmt_plugin.attacks import FGM, PGD, modality_means
    >>> result = evaluate_robustness(
    ...     crmt, test_loader,                           # any model taking a dict of tensors
    ...     attacks=[FGM(1.0), PGD(1.0, steps=10, restarts=2)],
    ...     radii=[0.1, 0.5, 1.0, 2.0],                  # each attack swept over these l2 budgets
    ...     lipschitz=lip,                               # adds certified accuracy (CRMTWrapper only)
    ...     fill=modality_means(train_loader),           # missing modality: zeros and training mean
    ... )
    >>> print(result.table("markdown", pivot=True))     # accuracy vs radius per attacked modality
    >>> result.plot("robustness.png")

and the modality-preference diagnosis::

    >>> report = modality_report(crmt, test_loader, radius=1.0, lipschitz=lip)
    >>> print(report)              # names the preferred modality and the weak spot

The model runs in eval mode; every submodule's ``training`` flag is restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._runtime import ModeGuard, call_model, iterate_batches, logits_of, output_logits
from .attacks import PGD, drop_modality
from .errors import CRMTError

__all__ = ["evaluate_robustness", "RobustnessResult", "modality_report", "ModalityReport"]

Subset = Tuple[str, ...]
Fill = Optional[Mapping[str, Union[float, Tensor]]]

_COLUMNS = ("attack", "modalities", "radius", "accuracy", "n", "sound")


# --------------------------------------------------------------------------------------------------
# shared plumbing


def _model_device(model: Any, device: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return None


def _move(inputs: Mapping[str, Tensor], y: Tensor, device: Optional[torch.device]) -> Tuple[Dict[str, Tensor], Tensor]:
    if device is None:
        return dict(inputs), y
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}, y.to(device)


def _correct(model: Any, inputs: Mapping[str, Tensor], y: Tensor) -> Tensor:
    with torch.no_grad():
        return logits_of(model, inputs).argmax(dim=1) == y


def _subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset)


def _default_subsets(modalities: Sequence[str]) -> List[Subset]:
    singles = [(m,) for m in modalities]
    return singles + [tuple(modalities)] if len(modalities) > 1 else singles


def _as_subsets(subsets: Any) -> List[Subset]:
    out = []
    for s in subsets:
        out.append((s,) if isinstance(s, str) else tuple(s))
    return out


def _can_certify(model: Any) -> bool:
    return callable(getattr(model, "certify", None))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def _render(header: Sequence[str], body: Sequence[Sequence[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    if fmt != "text":
        raise CRMTError(f"fmt must be 'text' or 'markdown', found {fmt!r}")
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the runner


@dataclass
class RobustnessResult:
    """Tidy result of :func:`evaluate_robustness`: one row per (attack, attacked modalities, radius).

    Each row is a dict with the keys ``attack`` (``"clean"``, ``"FGM-l2"``, ``"PGD-l2"``,
    ``"missing (zeros)"``, ``"missing (fill)"``, ``"certified"``), ``modalities`` (attacked, missing
    or certified modalities joined by ``+``), ``radius`` (l2 budget; ``nan`` where none applies),
    ``accuracy`` (fraction in [0, 1]), ``n`` (samples) and ``sound`` (certified rows: whether the
    Lipschitz constants are guaranteed upper bounds; ``None`` elsewhere).

    Example::

        >>> result.rows[0]
        {'attack': 'clean', 'modalities': 'audio+image', 'radius': 0.0, 'accuracy': 0.97, 'n': 600, 'sound': None}
        >>> result.accuracy("PGD-l2", "audio", 1.0)
        0.41
        >>> print(result.table("markdown", pivot=True))
        >>> result.plot("robustness.png")
    """

    rows: List[Dict[str, Any]]
    modalities: Tuple[str, ...]
    attacks: Dict[str, str] = field(default_factory=dict)  # label -> repr of the attack template

    @property
    def clean_accuracy(self) -> float:
        return float(self.select(attack="clean")[0]["accuracy"])

    def select(self, **where: Any) -> List[Dict[str, Any]]:
        """Rows whose fields equal the given values, e.g. ``select(attack="PGD-l2", modalities="audio")``."""
        unknown = set(where) - set(_COLUMNS)
        if unknown:
            raise CRMTError(f"select: unknown columns {sorted(unknown)}; columns are {list(_COLUMNS)}")
        return [r for r in self.rows if all(r[k] == v for k, v in where.items())]

    def accuracy(self, attack: str, modalities: Union[str, Sequence[str]], radius: float) -> float:
        """The accuracy of one row (modalities as ``"audio"``, ``"audio+image"`` or a sequence)."""
        name = modalities if isinstance(modalities, str) else _subset_name(modalities)
        found = [r for r in self.select(attack=attack, modalities=name) if math.isclose(r["radius"], radius)]
        if not found:
            have = sorted({(r["attack"], r["modalities"]) for r in self.rows})
            raise CRMTError(f"no row for attack={attack!r}, modalities={name!r}, radius={radius}; rows exist for {have}")
        return float(found[0]["accuracy"])

    def table(self, fmt: str = "text", *, pivot: bool = False, percent: bool = True) -> str:
        """The rows as a plain-text or markdown table.

        ``pivot=True`` gives the accuracy-vs-radius table of spec §1: one line per (attack,
        modalities), one column per radius; certified rows get their own table, and rows without a
        radius (clean, missing modality) are listed last.
        """
        scale, digits = (100.0, 1) if percent else (1.0, 4)

        def acc(v: float) -> str:
            return f"{v * scale:.{digits}f}"

        if not pivot:
            header = ["attack", "modalities", "radius", "accuracy" + (" %" if percent else ""), "n", "sound"]
            body = [[r["attack"], r["modalities"], _fmt(r["radius"]), acc(r["accuracy"]), str(r["n"]), _fmt(r["sound"])]
                    for r in self.rows]  # fmt: skip
            return _render(header, body, fmt)
        swept = [r for r in self.rows if not math.isnan(r["radius"]) and r["attack"] != "clean"]
        blocks = [[r for r in swept if r["attack"] != "certified"], [r for r in swept if r["attack"] == "certified"]]
        tables = []
        for block in blocks:  # attacks and certificates usually use different radii: two tables
            if not block:
                continue
            radii = sorted({r["radius"] for r in block})
            keys: List[Tuple[str, str]] = []
            for r in block:
                if (r["attack"], r["modalities"]) not in keys:
                    keys.append((r["attack"], r["modalities"]))
            header = ["attack", "modalities"] + [_fmt(v) for v in radii]
            body = []
            for attack, mods in keys:
                cells = {r["radius"]: r for r in block if r["attack"] == attack and r["modalities"] == mods}
                label = attack
                sound = {c["sound"] for c in cells.values()} - {None}
                if sound:
                    label += " (sound)" if sound == {True} else " (empirical)"
                body.append([label, mods] + [acc(cells[v]["accuracy"]) if v in cells else "-" for v in radii])
            tables.append(_render(header, body, fmt))
        text = "\n\n".join(tables)
        others = [r for r in self.rows if math.isnan(r["radius"]) or r["attack"] == "clean"]
        if others:
            extra = _render(["attack", "modalities", "accuracy" + (" %" if percent else "")],
                            [[r["attack"], r["modalities"], acc(r["accuracy"])] for r in others], fmt)  # fmt: skip
            text = (text + "\n\n" + extra) if text else extra
        return text

    def __str__(self) -> str:
        return self.table("text")

    def plot(self, path: Union[str, "Any"], *, title: Optional[str] = None, dpi: int = 100) -> str:
        """Accuracy vs radius, one panel per attack, one line per attacked modality set; saved as PNG.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns the path.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise CRMTError("RobustnessResult.plot needs matplotlib: pip install matplotlib") from None
        swept = [r for r in self.rows if not math.isnan(r["radius"]) and r["attack"] != "clean"]
        if not swept:
            raise CRMTError("nothing to plot: the result has no rows with a radius (give radii=[...])")
        attacks: List[str] = []
        for r in swept:
            if r["attack"] not in attacks:
                attacks.append(r["attack"])
        fig = Figure(figsize=(4.2 * len(attacks), 3.4), dpi=dpi)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(attacks), squeeze=False)[0]
        clean = self.select(attack="clean")
        order = [_subset_name(s) for s in _default_subsets(self.modalities)]
        for r in swept:
            if r["modalities"] not in order:
                order.append(r["modalities"])
        colours = {mods: f"C{i % 10}" for i, mods in enumerate(order)}  # one colour per modality set
        for ax, attack in zip(axes, attacks):
            subsets = [mods for mods in order if any(r["attack"] == attack and r["modalities"] == mods for r in swept)]
            for mods in subsets:
                pts = sorted((r["radius"], r["accuracy"]) for r in swept if r["attack"] == attack and r["modalities"] == mods)
                if clean and pts[0][0] > 0:  # at radius 0 every attack (and certificate) gives the clean accuracy
                    pts.insert(0, (0.0, clean[0]["accuracy"]))
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", markersize=3, color=colours[mods],
                        label=f"{mods}", linestyle="--" if attack == "certified" else "-")  # fmt: skip
            if clean:
                ax.axhline(100 * clean[0]["accuracy"], color="grey", linestyle=":", linewidth=1, label="clean")
            sound = {r["sound"] for r in swept if r["attack"] == attack} - {None}
            suffix = "" if not sound else (" (sound)" if sound == {True} else " (empirical)")
            ax.set_title(f"{attack}{suffix}", fontsize=10)
            ax.set_xlabel("l2 radius")
            ax.set_ylabel("accuracy %")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="attacked" if attack != "certified" else "perturbed", title_fontsize=8)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return str(path)


def _templates(attacks: Any) -> List[Tuple[str, PGD]]:
    if attacks is None:
        return []
    items = list(attacks.items()) if isinstance(attacks, Mapping) else [(None, a) for a in attacks]
    out: List[Tuple[str, PGD]] = []
    for label, attack in items:
        if not isinstance(attack, PGD):
            raise CRMTError(
                f"attacks must be FGM / PGD objects from crmt_plugin.attacks (used as templates), found "
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
    attacks: Optional[Union[Sequence[PGD], Mapping[str, PGD]]] = None,
    radii: Optional[Sequence[float]] = None,
    *,
    subsets: Optional[Sequence[Union[str, Sequence[str]]]] = None,
    lipschitz: Any = None,
    certified_radii: Optional[Sequence[float]] = None,
    missing: bool = True,
    fill: Fill = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: Optional[int] = 0,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
    progress: bool = False,
) -> RobustnessResult:
    """Accuracy under each attack x attacked modalities x radius, missing modalities, certificates.

    Example::

        >>> result = evaluate_robustness(model, test_loader, [FGM(1.0), PGD(1.0, steps=10, restarts=2)],
        ...                              radii=[0.1, 0.5, 1.0], fill=modality_means(train_loader))
        >>> print(result.table("markdown", pivot=True))
        | attack | modalities | 0.1 | 0.5 | 1 |
        |---|---|---|---|---|
        | FGM-l2 | audio | 95.2 | 80.1 | 55.0 |
        ...

    Args:
        model: callable on a dict of tensors returning logits (B, K) or an object with ``.logits``.
        loader: yields ``(inputs_dict, y)`` (or anything ``prepare_batch`` maps to that).
        attacks: :class:`~crmt_plugin.attacks.FGM` / :class:`~crmt_plugin.attacks.PGD` objects used as
            templates (their norm, steps, restarts, bounds, loss are kept), or a mapping label -> template.
        radii: budgets to sweep; each template is run with ``eps=r`` (one joint budget over the
            attacked modalities). ``None``: each template runs once with its own ``eps``.
        subsets: attacked modality sets, e.g. ``["audio", "image", ("audio", "image")]``. Default:
            the template's own ``modalities`` if set, else each modality alone and all together.
        lipschitz: with a model that has ``certify`` (a ``CRMTWrapper``), adds certified accuracy
            rows per radius (joint and per modality): the fraction of samples classified correctly
            with certified radius ``>= r``, with the certificate's ``sound`` flag.
        certified_radii: radii of the certified rows (default: ``radii``; without radii, 0 and the
            templates' budgets). Certificates are cheap: one forward pass per batch for all radii.
        missing: add missing-modality rows (each modality replaced by zeros, and by ``fill``).
        fill: e.g. :func:`~crmt_plugin.attacks.modality_means` of the training loader.
        device: where to move the batches; default: the device of the model's first parameter
            (batches stay where they are for models without parameters).
        seed: seeds one ``torch.Generator`` given to every template without its own (reproducible
            random starts); ``None`` uses the global RNG.
        max_batches: stop after this many batches (quick looks).
        progress: a tqdm progress bar over batches (if tqdm is missing: a warning, no bar).
    """
    templates = _templates(attacks)
    if radii is not None:
        radii = [float(r) for r in radii]
        if any(not math.isfinite(r) or r < 0 for r in radii):
            raise CRMTError(f"radii must be finite numbers >= 0, found {radii}")
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
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    target = _model_device(model, device)
    subset_arg = _as_subsets(subsets) if subsets is not None else None

    counts: Dict[Tuple[str, str, float], List[Any]] = {}  # key -> [correct, n, sound]

    def add(attack: str, mods: str, radius: float, correct: Tensor, sound: Optional[bool] = None) -> None:
        entry = counts.setdefault((attack, mods, radius), [0, 0, sound])
        entry[0] += int(correct.sum().item())
        entry[1] += int(correct.numel())

    modalities: Optional[Tuple[str, ...]] = None
    runs: List[Tuple[str, Subset, float, PGD]] = []
    with ModeGuard(model, True):
        for inputs, y in iterate_batches(loader, prepare_batch, progress=progress, desc="robustness", max_batches=max_batches):
            inputs, y = _move(inputs, y, target)
            if modalities is None:
                modalities = tuple(k for k, v in inputs.items() if isinstance(v, Tensor))
                for label, t in templates:
                    extra: Dict[str, Any] = {}
                    if t.generator is None and generator is not None:
                        extra["generator"] = generator
                    if isinstance(t.eps, Mapping):  # per-modality budgets: run as given (radii is None)
                        runs.append((label, tuple(t.eps), math.nan, t.replace(**extra) if extra else t))
                        continue
                    chosen = subset_arg or ([t.modalities] if t.modalities is not None else _default_subsets(modalities))
                    for subset in chosen:
                        unknown = [m for m in subset if m not in modalities]
                        if unknown:
                            raise CRMTError(f"subset {subset} names {unknown}, not in the inputs {list(modalities)}")
                        for r in radii if radii is not None else [float(t.eps)]:
                            runs.append((label, subset, r, t.replace(eps=r, modalities=subset, **extra)))
            all_name = _subset_name(modalities)
            add("clean", all_name, 0.0, _correct(model, inputs, y))
            for label, subset, r, attack in runs:
                adv = attack(model, inputs, y)
                add(label, _subset_name(subset), r, _correct(model, adv, y))
            if missing:
                for m in modalities:
                    add("missing (zeros)", m, math.nan, _correct(model, drop_modality(inputs, m), y))
                    if fill is not None and m in fill:
                        add("missing (fill)", m, math.nan, _correct(model, drop_modality(inputs, m, fill=fill), y))
            if lipschitz is not None:
                cert = model.certify(inputs, y, lipschitz=lipschitz)  # type: ignore[union-attr]
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


# --------------------------------------------------------------------------------------------------
# modality-preference diagnostics


@dataclass
class ModalityReport:
    """Per-modality diagnostics of modality preference (see :func:`modality_report`).

    Attributes:
        per_modality: {name: {metric: value}} with ``missing_accuracy`` (modality replaced by zeros),
            ``missing_fill_accuracy`` (by the fill, if given), ``attack_accuracy`` (uni-modal attack at
            ``radius``), ``unimodal_margin`` (mean of z_y^(m) - max_{k!=y} z_k^(m), CRMT models),
            ``unimodal_accuracy`` (argmax of z^(m)), ``integration_weight`` (mean over classes of a^(m))
            and ``certified_radius`` (mean radius when only that modality is perturbed); ``None``
            where not available for the model.
        clean_accuracy, n, radius, attack: the setting.
        preferred: the modality whose absence costs the most accuracy (the model leans on it);
            absence = replaced by the fill when one is given for every modality, else by zeros.
        weak_spot: the modality whose uni-modal attack at ``radius`` costs the most accuracy.
        sound: the certificate's flag (``None`` without Lipschitz constants).
    """

    per_modality: Dict[str, Dict[str, Optional[float]]]
    clean_accuracy: float
    n: int
    radius: float
    attack: str
    preferred: str
    weak_spot: str
    sound: Optional[bool] = None

    def summary(self) -> str:
        """Two or three sentences naming the preferred modality and the weak spot."""
        pm = self.per_modality
        others = [m for m in pm if m != self.preferred]
        filled = all(v.get("missing_fill_accuracy") is not None for v in pm.values())
        key, how = ("missing_fill_accuracy", "filled") if filled else ("missing_accuracy", "zeroed")
        missing = ", ".join(f"{pm[m][key]:.1%} with {m} {how}" for m in [self.preferred] + others)
        lines = [
            f"Preferred modality: {self.preferred} (clean accuracy {self.clean_accuracy:.1%}; {missing}).",
            f"Weak spot: {self.weak_spot} ({self.attack} with l2 radius {self.radius:g} on it alone leaves "
            f"{pm[self.weak_spot]['attack_accuracy']:.1%} accuracy; "
            + ", ".join(f"{pm[m]['attack_accuracy']:.1%} on {m}" for m in pm if m != self.weak_spot)
            + ").",
        ]
        margins = {m: v["unimodal_margin"] for m, v in pm.items() if v.get("unimodal_margin") is not None}
        if len(margins) == len(pm) and len(pm) > 1:
            weakest = min(margins, key=lambda m: margins[m])  # type: ignore[arg-type, return-value]
            lines.append(
                f"Smallest uni-modal margin: {weakest} ({margins[weakest]:.3g}; "
                + ", ".join(f"{m} {v:.3g}" for m, v in margins.items() if m != weakest)
                + ") - the modality the CRMT margin term should raise."
            )
        return "\n".join(lines)

    def table(self, fmt: str = "text") -> str:
        """One line per modality, one column per metric."""
        metrics: List[str] = []
        for values in self.per_modality.values():
            for k, v in values.items():
                if v is not None and k not in metrics:
                    metrics.append(k)
        body = [[m] + [_fmt(values.get(k), 3) for k in metrics] for m, values in self.per_modality.items()]
        return _render(["modality"] + metrics, body, fmt)

    def __str__(self) -> str:
        return self.table("text") + "\n\n" + self.summary()


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
    attack: Optional[PGD] = None,
    lipschitz: Any = None,
    fill: Fill = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: Optional[int] = 0,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable[[Any], Tuple[Mapping[str, Tensor], Tensor]]] = None,
    progress: bool = False,
) -> ModalityReport:
    """Which modality does the model prefer, and where is it fragile? One pass over the loader.

    Example::

        >>> report = modality_report(crmt, test_loader, radius=1.0, lipschitz=lip)
        >>> report.preferred, report.weak_spot
        ('audio', 'audio')
        >>> print(report)

    Args:
        radius: l2 budget of the uni-modal attacks.
        attack: template (default ``PGD(radius, steps=10)``), run on each modality alone with ``eps=radius``.
        lipschitz: adds the mean per-modality certified radius (models with ``certify``).
        fill: missing-modality fill (e.g. training means); zeros are always reported.
        others: as in :func:`evaluate_robustness`.

    For a ``CRMTWrapper`` the uni-modal margins and accuracies come from ``out.unimodal`` and the
    integration weights from ``integration_weights()``; for plain models those entries are ``None``
    and the preference is read from the missing-modality accuracies alone.
    """
    radius = float(radius)
    template = attack if attack is not None else PGD(radius, steps=10)
    if not isinstance(template, PGD):
        raise CRMTError(f"attack must be an FGM / PGD object, found {type(template).__name__}")
    if lipschitz is not None and not _can_certify(model):
        raise CRMTError(
            f"certified radii need a model with `certify` (a CRMTWrapper); found {type(model).__name__}"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    target = _model_device(model, device)
    sums: Dict[str, Dict[str, float]] = {}
    n = 0
    clean = 0
    sound: Optional[bool] = None
    modalities: Optional[Tuple[str, ...]] = None
    attacks: Dict[str, PGD] = {}
    has_unimodal = True
    with ModeGuard(model, True):
        for inputs, y in iterate_batches(loader, prepare_batch, progress=progress, desc="modality report", max_batches=max_batches):
            inputs, y = _move(inputs, y, target)
            if modalities is None:
                modalities = tuple(k for k, v in inputs.items() if isinstance(v, Tensor))
                sums = {m: {} for m in modalities}
                for m in modalities:
                    changes: Dict[str, Any] = {"eps": radius, "modalities": (m,)}
                    if template.generator is None and generator is not None:
                        changes["generator"] = generator
                    attacks[m] = template.replace(**changes)

            def acc(key: str, m: str, value: Tensor) -> None:
                sums[m][key] = sums[m].get(key, 0.0) + float(value.double().sum())

            with torch.no_grad():
                out = call_model(model, inputs)
            logits = output_logits(out)
            clean += int((logits.argmax(1) == y).sum())
            unimodal = getattr(out, "unimodal", None)
            has_unimodal = has_unimodal and isinstance(unimodal, Mapping)
            for m in modalities:
                acc("missing_accuracy", m, _correct(model, drop_modality(inputs, m), y))
                if fill is not None and m in fill:
                    acc("missing_fill_accuracy", m, _correct(model, drop_modality(inputs, m, fill=fill), y))
                acc("attack_accuracy", m, _correct(model, attacks[m](model, inputs, y), y))
                if has_unimodal and m in unimodal:  # type: ignore[operator]
                    z = unimodal[m].detach()  # type: ignore[index]
                    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
                    runner_up = z.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
                    acc("unimodal_margin", m, z_y - runner_up)
                    acc("unimodal_accuracy", m, z.argmax(1) == y)
            if lipschitz is not None:
                cert = model.certify(inputs, y, lipschitz=lipschitz)  # type: ignore[union-attr]
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
    missing_key = "missing_fill_accuracy" if all(per_modality[m]["missing_fill_accuracy"] is not None for m in modalities) else "missing_accuracy"
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
