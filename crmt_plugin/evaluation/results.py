"""Result types of the evaluation: :class:`RobustnessResult` and :class:`ModalityReport`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import CRMTError
from .render import format_value, plot_robustness, render_table, robustness_table, subset_name

__all__ = ["RobustnessResult", "ModalityReport", "COLUMNS"]

COLUMNS = ("attack", "modalities", "radius", "accuracy", "n", "sound")


@dataclass
class RobustnessResult:
    """Tidy result of :func:`evaluate_robustness`: one row per (attack, attacked modalities, radius).

    Each row is a dict with the keys ``attack`` (``"clean"``, an attack label such as ``"strong-l2"``,
    ``"FGM-l2"`` or ``"PGD-l2"``,
    ``"missing (zeros)"``, ``"missing (fill)"``, ``"certified"``), ``modalities`` (attacked, missing
    or certified modalities joined by ``+``), ``radius`` (l2 budget; ``nan`` where none applies),
    ``accuracy`` (fraction in [0, 1]), ``n`` (samples) and ``sound`` (certified rows: whether the
    Lipschitz constants are guaranteed upper bounds; ``None`` elsewhere).

    Example::

        result.rows[0]
        # {'attack': 'clean', 'modalities': 'audio+image', 'radius': 0.0, 'accuracy': 0.97, 'n': 600, 'sound': None}
        result.accuracy("strong-l2", "audio", 1.0)          # 0.41
        print(result.table("markdown", pivot=True))
        result.plot("robustness.png")
    """

    rows: List[Dict[str, Any]]
    modalities: Tuple[str, ...]
    attacks: Dict[str, str] = field(default_factory=dict)  # label -> repr of the attack template

    @property
    def clean_accuracy(self) -> float:
        return float(self.select(attack="clean")[0]["accuracy"])

    def select(self, **where: Any) -> List[Dict[str, Any]]:
        """Rows whose fields equal the given values, e.g. ``select(attack="PGD-l2", modalities="audio")``."""
        unknown = set(where) - set(COLUMNS)
        if unknown:
            raise CRMTError(f"select: unknown columns {sorted(unknown)}; columns are {list(COLUMNS)}")
        return [r for r in self.rows if all(r[k] == v for k, v in where.items())]

    def accuracy(self, attack: str, modalities: Union[str, Sequence[str]], radius: float) -> float:
        """The accuracy of one row (modalities as ``"audio"``, ``"audio+image"`` or a sequence)."""
        name = modalities if isinstance(modalities, str) else subset_name(modalities)
        found = [r for r in self.select(attack=attack, modalities=name) if math.isclose(r["radius"], radius)]
        if not found:
            have = sorted({(r["attack"], r["modalities"]) for r in self.rows})
            raise CRMTError(f"no row for attack={attack!r}, modalities={name!r}, radius={radius}; "
                            f"rows exist for {have}")
        return float(found[0]["accuracy"])

    def table(self, fmt: str = "text", *, pivot: bool = False, percent: bool = True) -> str:
        """The rows as a plain-text or markdown table.

        ``pivot=True`` gives the accuracy-vs-radius table of spec §1: one line per (attack,
        modalities), one column per radius; certified rows get their own table, and rows without a
        radius (clean, missing modality) are listed last.
        """
        return robustness_table(self.rows, fmt, pivot=pivot, percent=percent)

    def __str__(self) -> str:
        return self.table("text")

    def plot(self, path: Union[str, "Any"], *, title: Optional[str] = None, dpi: int = 100) -> str:
        """Accuracy vs radius, one panel per attack, one line per attacked modality set; saved as PNG.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns the path.
        """
        return plot_robustness(self.rows, self.modalities, path, title=title, dpi=dpi)


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
        body = [[m] + [format_value(values.get(k), 3) for k in metrics] for m, values in self.per_modality.items()]
        return render_table(["modality"] + metrics, body, fmt)

    def __str__(self) -> str:
        return self.table("text") + "\n\n" + self.summary()
