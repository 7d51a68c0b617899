"""The benchmark's outputs: ``results.json``, ``results.md`` and ``robustness.png``.

``results.json`` (fixed keys; more keys are extras)::

    {"radius": float, "modalities": [...], "classes": K,
     "rows": [{"method", "seed", "clean", "pgd_joint", "worst_joint", "pgd:<m>", "missing:<m>",
               "certified_empirical", ...}, ...]}

``results.md``: per method the mean ± std over seeds (in %), then per (baseline, CRMT variant) the
mean difference variant − baseline ± its std over seeds and the number of seeds where the variant is
higher; models flagged for gradient masking are listed.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .._optional import require
from ..errors import CRMTError, warn
from .recipes import PAIRS

__all__ = ["columns", "summarize", "pair_differences", "write_json", "render_markdown", "write_markdown",
           "plot_robustness", "load_results", "sound_region_lines"]


def columns(modalities: Sequence[str]) -> List[str]:
    """The table's accuracy columns, in order."""
    return (["clean", "pgd_joint", "worst_joint"] + [f"pgd:{m}" for m in modalities]
            + [f"missing:{m}" for m in modalities]
            + ["gradient_free", "certified_empirical", "certified_sound"]
            + [f"certified_sound:{m}" for m in modalities] + ["mean_robust"])


def _values(rows: Sequence[Mapping[str, Any]], method: str, key: str) -> Dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows
            if r["method"] == method and r.get(key) is not None and not _nan(r.get(key))}


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _mean_std(values: Sequence[float]):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[Mapping[str, Any]], modalities: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """method -> column -> (mean, std, seeds), in the rows' method order."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["method"], {})
    for method in out:
        for c in columns(modalities):
            v = list(_values(rows, method, c).values())
            mean, std = _mean_std(v)
            out[method][c] = (mean, std, len(v))
    return out


def pair_differences(rows: Sequence[Mapping[str, Any]], modalities: Sequence[str],
                     pairs: Sequence = PAIRS) -> List[Dict[str, Any]]:
    """Per (baseline, variant) present in the rows and per column: mean (variant - baseline) over
    the seeds both have, its std, the number of those seeds where the variant is higher."""
    methods = {r["method"] for r in rows}
    out = []
    for base, variant in pairs:
        if base not in methods or variant not in methods:
            continue
        entry: Dict[str, Any] = {"baseline": base, "variant": variant, "columns": {}}
        for c in columns(modalities):
            b, v = _values(rows, base, c), _values(rows, variant, c)
            seeds = sorted(set(b) & set(v))
            diffs = [v[s] - b[s] for s in seeds]
            mean, std = _mean_std(diffs)
            entry["columns"][c] = {"mean": mean, "std": std, "higher": sum(d > 0 for d in diffs), "seeds": len(seeds)}
        out.append(entry)
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str, results: Mapping[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(_json_safe(dict(results)), f, indent=1)
    return path


def load_results(path: str) -> Dict[str, Any]:
    """Read a ``results.json`` (CRMTError when it is not one)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CRMTError(f"{path}: not a readable results.json ({exc})") from None
    for key in ("radius", "modalities", "classes", "rows"):
        if key not in data:
            raise CRMTError(f"{path}: results.json lacks the key {key!r}")
    return data


def _pct(mean: Optional[float], std: Optional[float] = None, n: int = 0) -> str:
    if mean is None:
        return "–"
    if std is None or n < 2:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _label(column: str) -> str:
    return {"clean": "clean", "pgd_joint": "PGD joint", "worst_joint": "worst joint",
            "gradient_free": "gradient-free", "certified_empirical": "cert. (emp.)",
            "certified_sound": "cert. (sound)", "mean_robust": "mean robust"}.get(
        column, column.replace("certified_sound:", "cert. sound ").replace("pgd:", "PGD ").replace(
            "missing:", "missing "))


def render_markdown(results: Mapping[str, Any], title: str = "crmt-benchmark results") -> str:
    """The ``results.md`` page of one run."""
    rows, mods = results["rows"], results["modalities"]
    cols = columns(mods)
    summary = summarize(rows, mods)
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"# {title}", ""]
    data = results.get("data", "")
    lines.append(f"Data `{data}`: modalities {', '.join(mods)}, {results['classes']} classes, split "
                 f"{results.get('split_sizes', '')}. l2 radius r = {results['radius']:g} in the file's input units "
                 f"({results.get('radius_source', '')}); seeds {seeds}. Accuracy on the test split, %, mean ± std "
                 "over seeds.")
    lines.append("")
    lines.append("Columns: PGD joint / PGD m = strongest gradient attack (all modalities jointly / m alone, budget r); "
                 "gradient-free = query attack on the joint budget; worst joint = per sample the worst of all "
                 "attacks; missing m = m replaced by its train mean; cert. = certified accuracy at r (empirical / "
                 "sound Lipschitz constants); mean robust = mean of worst joint, PGD m and missing m.")
    lines.append("")
    lines.append("| method | " + " | ".join(_label(c) for c in cols) + " |")
    lines.append("|---|" + "|".join("--:" for _ in cols) + "|")
    for method, s in summary.items():
        lines.append(f"| {method} | " + " | ".join(_pct(*s[c]) for c in cols) + " |")
    diffs = pair_differences(rows, mods)
    if diffs:
        lines += ["", "## CRMT variant − baseline", "",
                  "Points (variant − baseline, mean ± std over seeds), then how many seeds the variant is higher.", ""]
        lines.append("| variant − baseline | " + " | ".join(_label(c) for c in cols) + " |")
        lines.append("|---|" + "|".join("--:" for _ in cols) + "|")
        for d in diffs:
            cells = []
            for c in cols:
                e = d["columns"][c]
                if e["mean"] is None:
                    cells.append("–")
                else:
                    cells.append(f"{100 * e['mean']:+.1f} ± {100 * e['std']:.1f} ({e['higher']}/{e['seeds']})")
            lines.append(f"| {d['variant']} − {d['baseline']} | " + " | ".join(cells) + " |")
    flagged = [r for r in rows if r.get("gradient_masking")]
    lines += ["", "## Gradient masking check", ""]
    if flagged:
        lines.append("The gradient-free attack found markedly more errors than the gradient attacks (≥ "
                     f"{100 * results.get('masking_margin', 0.03):.0f} points) on:")
        lines.append("")
        for r in flagged:
            lines.append(f"* {r['method']} seed {r['seed']}: gradient-free {100 * r['gradient_free']:.1f} % vs "
                         f"PGD joint {100 * r['pgd_joint']:.1f} %")
    else:
        lines.append("No model flagged: on every model the gradient-free attack left at least as much accuracy as "
                     "the gradient attacks, minus "
                     f"{100 * results.get('masking_margin', 0.03):.0f} points.")
    lines += sound_region_lines(rows, mods, results["radius"])
    notes = sorted({r.get("certified_sound_note") for r in rows if r.get("certified_sound_note")})
    if notes:
        lines += ["", "Sound certificates not available: " + "; ".join(notes)]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}` ({results.get('seconds', 0):.0f} s)."]
    return "\n".join(lines) + "\n"


def sound_region_lines(rows: Sequence[Mapping[str, Any]], modalities: Sequence[str], radius: float) -> List[str]:
    """``results.md``'s per-modality-budget region: per method (mean over seeds), the % of test samples certified
    under every perturbation with ||eps^(m)|| <= budget_m of the first two modalities at once (the others 0)."""
    with_region = [r for r in rows if r.get("certified_sound_region")]
    if not with_region or len(modalities) < 2:
        return []
    first, second = modalities[0], modalities[1]
    lines = ["", "## Sound certified region (per-modality budgets)", "",
             f"% of test samples certified under every perturbation with ||eps_{first}|| <= row budget and "
             f"||eps_{second}|| <= column budget at once (`Certificate.certified`), sound constants; r = {radius:g}; "
             "mean over seeds."]
    for method in dict.fromkeys(r["method"] for r in with_region):
        cells: Dict[Any, List[float]] = {}
        for r in with_region:
            if r["method"] != method:
                continue
            for entry in r["certified_sound_region"]:
                eps = entry["eps"]
                if any(float(v) for k, v in eps.items() if k not in (first, second)):
                    continue
                cells.setdefault((float(eps.get(first, 0.0)), float(eps.get(second, 0.0))), []).append(
                    float(entry["certified"]))
        xs = sorted({k[0] for k in cells})
        ys = sorted({k[1] for k in cells})
        lines += ["", f"**{method}** (rows: {first} budget, columns: {second} budget)", "",
                  f"| {first} \\ {second} | " + " | ".join(f"{v:g}" for v in ys) + " |",
                  "|---|" + "|".join("--:" for _ in ys) + "|"]
        for xv in xs:
            lines.append(f"| {xv:g} | " + " | ".join(
                _pct(statistics.fmean(cells[(xv, yv)])) if (xv, yv) in cells else "–" for yv in ys) + " |")
    return lines


def write_markdown(path: str, results: Mapping[str, Any]) -> str:
    with open(path, "w") as f:
        f.write(render_markdown(results))
    return path


def plot_robustness(path: str, results: Mapping[str, Any]) -> Optional[str]:
    """``robustness.png``: accuracy vs l2 radius, one panel per attacked set (all modalities jointly,
    each alone), one curve per method (mean over seeds). Without matplotlib: a warning, no file."""
    try:
        require("matplotlib", "robustness.png")
    except CRMTError as exc:
        warn(f"{exc}; robustness.png not written")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, mods = results["rows"], results["modalities"]
    panels = ["joint"] + list(mods)
    fig = Figure(figsize=(3.6 * len(panels), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, panel in zip(axes, panels):
        for i, method in enumerate(methods):
            curves = [r["curve"][panel] for r in rows if r["method"] == method and "curve" in r]
            if not curves:
                continue
            radii = [p[0] for p in curves[0]]
            acc = [statistics.fmean(c[j][1] for c in curves) for j in range(len(radii))]
            ax.plot(radii, [100 * a for a in acc], marker="o", markersize=3, label=method, color=f"C{i % 10}",
                    linestyle="--" if method.startswith(("crmt", "paper")) else "-")
        ax.axvline(results["radius"], color="grey", lw=0.8, alpha=0.6)
        ax.set_title("all modalities (joint budget)" if panel == "joint" else f"{panel} only", fontsize=10)
        ax.set_xlabel("l2 radius (input units)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
