"""Rendering of evaluation results: plain-text / markdown tables and the accuracy-vs-radius plot
(matplotlib, optional: ``crmt_plugin._optional.require``)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._optional import require
from ..errors import CRMTError

__all__ = ["format_value", "render_table", "subset_name", "default_subsets", "robustness_table", "plot_robustness"]


def subset_name(subset: Sequence[str]) -> str:
    """``("audio", "image")`` -> ``"audio+image"``."""
    return "+".join(subset)


def default_subsets(modalities: Sequence[str]) -> List[Tuple[str, ...]]:
    """Each modality alone, then all together (when there are several)."""
    singles = [(m,) for m in modalities]
    return singles + [tuple(modalities)] if len(modalities) > 1 else singles


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}"
    return str(value)


def render_table(header: Sequence[str], body: Sequence[Sequence[str]], fmt: str) -> str:
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


def robustness_table(rows: List[Dict[str, Any]], fmt: str = "text", *, pivot: bool = False,
                     percent: bool = True) -> str:
    """The rows of a :class:`~crmt_plugin.evaluation.RobustnessResult` as a table (see its ``table``)."""
    scale, digits = (100.0, 1) if percent else (1.0, 4)

    def acc(v: float) -> str:
        return f"{v * scale:.{digits}f}"

    if not pivot:
        header = ["attack", "modalities", "radius", "accuracy" + (" %" if percent else ""), "n", "sound"]
        body = [[r["attack"], r["modalities"], format_value(r["radius"]), acc(r["accuracy"]), str(r["n"]),
                 format_value(r["sound"])] for r in rows]
        return render_table(header, body, fmt)
    swept = [r for r in rows if not math.isnan(r["radius"]) and r["attack"] != "clean"]
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
        header = ["attack", "modalities"] + [format_value(v) for v in radii]
        body = []
        for attack, mods in keys:
            cells = {r["radius"]: r for r in block if r["attack"] == attack and r["modalities"] == mods}
            label = attack
            sound = {c["sound"] for c in cells.values()} - {None}
            if sound:
                label += " (sound)" if sound == {True} else " (empirical)"
            body.append([label, mods] + [acc(cells[v]["accuracy"]) if v in cells else "-" for v in radii])
        tables.append(render_table(header, body, fmt))
    text = "\n\n".join(tables)
    others = [r for r in rows if math.isnan(r["radius"]) or r["attack"] == "clean"]
    if others:
        extra = render_table(["attack", "modalities", "accuracy" + (" %" if percent else "")],
                        [[r["attack"], r["modalities"], acc(r["accuracy"])] for r in others], fmt)  # fmt: skip
        text = (text + "\n\n" + extra) if text else extra
    return text


def plot_robustness(rows: List[Dict[str, Any]], modalities: Sequence[str], path: Any, *,
                    title: Optional[str] = None, dpi: int = 100) -> str:
    """Accuracy vs radius, one panel per attack, one line per attacked modality set; saved as PNG.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns the path."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "RobustnessResult.plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "RobustnessResult.plot").Figure
    swept = [r for r in rows if not math.isnan(r["radius"]) and r["attack"] != "clean"]
    if not swept:
        raise CRMTError("nothing to plot: the result has no rows with a radius (give radii=[...])")
    attacks: List[str] = []
    for r in swept:
        if r["attack"] not in attacks:
            attacks.append(r["attack"])
    fig = Figure(figsize=(4.2 * len(attacks), 3.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(attacks), squeeze=False)[0]
    clean = [r for r in rows if r["attack"] == "clean"]
    order = [subset_name(s) for s in default_subsets(modalities)]
    for r in swept:
        if r["modalities"] not in order:
            order.append(r["modalities"])
    colours = {mods: f"C{i % 10}" for i, mods in enumerate(order)}  # one colour per modality set
    for ax, attack in zip(axes, attacks):
        subsets = [mods for mods in order if any(r["attack"] == attack and r["modalities"] == mods for r in swept)]
        for mods in subsets:
            pts = sorted((r["radius"], r["accuracy"]) for r in swept
                         if r["attack"] == attack and r["modalities"] == mods)
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
