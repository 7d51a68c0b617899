"""Regenerate docs/results.md: the eight training methods x several seeds on the real data, measured.

    python examples/results.py --trades-rho    # the committed page: AV digits + mfeat, 3 seeds, 2 processes

writes ``docs/results.md`` and ``docs/figures/results_*.png`` (12-20 minutes on 2 CPU cores, depending
on what else runs; every run's checkpoint and metrics.json go to ``runs/results/``). Quicker looks::

    python examples/results.py --datasets av --seeds 0 --methods jt crmt_jt --page /tmp/results.md
    python examples/results.py --resume          # reuse finished runs in runs/results/

Each run is one of the example scripts (``jt.py``, ``crmt_jt.py``, ``pgd_at.py``, ``crmt_at.py``,
``trades.py``, ``crmt_trades.py``, ``mixup.py``, ``crmt_mix.py``) called with its default settings,
``--seed`` s and ``--quiet``; model selection is on the validation split, every number on the page
is on the test split. The page states the paper's three claims and checks each against the numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

METHODS = {  # script -> label, in table order
    "jt": "JT", "crmt_jt": "CRMT-JT",
    "pgd_at": "PGD-AT", "crmt_at": "CRMT-AT",
    "trades": "TRADES", "crmt_trades": "CRMT-TRADES",
    "mixup": "Mixup", "crmt_mix": "CRMT-Mix",
}  # fmt: skip
PAIRS = [("jt", "crmt_jt"), ("pgd_at", "crmt_at"), ("trades", "crmt_trades"), ("mixup", "crmt_mix")]
# Investigation runs (AV digits): label -> (script, extra flags) trained from scratch, or
# label -> ("step2", CRMT script, epochs): the finished CRMT run's step 2 continued for more epochs.
ABLATIONS = {
    "CRMT-JT + 20 more step-2 epochs": ("step2", "crmt_jt", 20),
    "CRMT-AT + 20 more step-2 epochs": ("step2", "crmt_at", 20),
    "CRMT-TRADES + 20 more step-2 epochs": ("step2", "crmt_trades", 20),
    "CRMT-Mix + 20 more step-2 epochs": ("step2", "crmt_mix", 20),
}
TRADES_RHO = {  # one seed: the margin weight (and temperature) under TRADES
    **{f"CRMT-TRADES, rho {rho:g}": ("crmt_trades", ["--rho", f"{rho:g}"]) for rho in (0.0, 0.5, 1.0, 4.0)},
    "CRMT-TRADES, temperature 20": ("crmt_trades", ["--temperature", "20"]),
}
CERT_SWEEP = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
COST = {"jt": 1, "crmt_jt": 1, "mixup": 1, "crmt_mix": 1, "pgd_at": 3, "crmt_at": 3, "trades": 3, "crmt_trades": 3}


# --------------------------------------------------------------------------------------------------
# running


def _job_argv(dataset: str, seed: int, out: str, extra: Sequence[str]) -> List[str]:
    return ["--dataset", dataset, "--seed", str(seed), "--out", out, "--quiet", "--threads", "1",
            "--cert-radii", *map(str, CERT_SWEEP), *extra]


def continue_step2(script: str, source: str, epochs: int, argv: Sequence[str]) -> Dict[str, Any]:
    """Load a finished CRMT run from ``source`` and run step 2 for ``epochs`` more epochs (only a^(m)
    changes; the Lipschitz constants of the uni-modal logits do not depend on a), then evaluate."""
    import crmt_plugin
    import torch

    with open(os.path.join(source, "metrics.json")) as f:
        before = json.load(f)
    args = common.parse_args(__doc__, list(argv), crmt=True)
    run = common.setup(args, before["method"] + "+step2")
    model = run.model
    crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)
    crmt.load_state_dict(torch.load(os.path.join(source, "crmt.pt")))
    saved = before["lipschitz"]
    lipschitz = crmt_plugin.LipschitzConstants(torch.tensor(saved["values"], dtype=torch.float64),
                                               saved["modalities"], saved["sound"], saved["source"])
    run.best_val, run.best_epoch, run.history = before["val_accuracy"], before["best_epoch"], before["history"]
    step2 = crmt.fit_integration(run.train_loader, lipschitz=lipschitz, epochs=epochs, lr=args.integration_lr)
    return run.finish(model, crmt, lipschitz, step2=vars(step2), continued_from=source)


def _work(job: Tuple[str, str, Any, List[str]]) -> Tuple[str, Dict[str, Any]]:
    key, script, continuation, argv = job
    import torch

    torch.set_num_threads(1)
    started = time.time()
    if continuation is None:
        metrics = importlib.import_module(script).main(argv)
    else:
        metrics = continue_step2(script, continuation[0], continuation[1], argv)
    metrics.pop("result", None)
    metrics["wall_seconds"] = time.time() - started
    return key, metrics


def run_all(jobs: List[Tuple[str, str, Any, List[str]]], processes: int, resume: bool,
            done: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """jobs: (key, script, continuation or None, argv); returns key -> metrics (metrics.json when resuming)."""
    done = {} if done is None else done
    todo = []
    for key, script, continuation, argv in jobs:
        path = os.path.join(argv[argv.index("--out") + 1], "metrics.json")
        if resume and os.path.exists(path):
            with open(path) as f:
                done[key] = json.load(f)
            continue
        todo.append((key, script, continuation, argv))
    if not todo:
        return done
    todo.sort(key=lambda j: -COST.get(j[1], 1) if j[2] is None else 0)  # long runs first: better packing
    print(f"{len(todo)} runs on {processes} process(es)" + (f", {len(jobs) - len(todo)} reused" if resume else ""),
          flush=True)
    started = time.time()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for i, (key, metrics) in enumerate(pool.imap_unordered(_work, todo), 1):
            done[key] = metrics
            print(f"[{i}/{len(todo)} {time.time() - started:5.0f} s] {key}: clean "
                  f"{metrics['summary']['clean']:.3f} ({metrics['wall_seconds']:.0f} s)", flush=True)
    return done


# --------------------------------------------------------------------------------------------------
# statistics


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def mfeat_columns(summary: Mapping[str, float], views: Sequence[str]) -> Dict[str, float]:
    """mfeat has six views: keep the joint columns, and per-view attacks / missing as worst and mean."""
    out = {k: v for k, v in summary.items() if not any(f" {m}" in k for m in views)}
    for r in common.TABLE_RADII:
        attacked = [summary[f"PGD {m} {r:g}"] for m in views if f"PGD {m} {r:g}" in summary]
        if attacked:
            out[f"PGD worst-view {r:g}"] = min(attacked)
    missing = [summary[f"missing {m}"] for m in views if f"missing {m}" in summary]
    if missing:
        out["missing worst view"] = min(missing)
        out["missing mean"] = statistics.fmean(missing)
    order = ["clean", "FGM 1", "PGD 1", "PGD 2", "PGD worst-view 1", "PGD worst-view 2", "missing worst view",
             "missing mean", "cert 0.5", "cert 1"]
    return {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}


def collect(runs: Mapping[str, Dict[str, Any]], dataset: str, label: str, seeds: Sequence[int],
            views: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    """column -> [value per seed] of one method (label) on one dataset."""
    columns: Dict[str, List[float]] = {}
    for seed in seeds:
        m = runs.get(f"{dataset}/{label}/seed{seed}")
        if m is None:
            continue
        summary = m["summary"] if views is None else mfeat_columns(m["summary"], views)
        for c, v in summary.items():
            columns.setdefault(c, []).append(v)
    return columns


def short(column: str) -> str:
    """Compact table header: ``"PGD audio 2"`` -> ``"PGD r=2 audio"``, ``"PGD 1"`` -> ``"PGD r=1 joint"``."""
    parts = column.split()
    if parts[0] in ("PGD", "FGM"):
        where = "joint" if len(parts) == 2 else " ".join(parts[1:-1])
        return f"{parts[0]} r={parts[-1]} {where}"
    if parts[0] == "cert":
        return f"certified r={parts[1]}"
    if column == "missing worst view":
        return "missing worst view"
    if column == "missing mean":
        return "missing (mean of views)"
    return column


def table(rows: Mapping[str, Mapping[str, List[float]]], describe=short) -> str:
    columns: List[str] = []
    for cols in rows.values():
        columns += [c for c in cols if c not in columns]
    header = ["method"] + [describe(c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * len(columns)) + "|"]
    for name, cols in rows.items():
        lines.append("| " + " | ".join([name] + [cell(cols.get(c, [])) for c in columns]) + " |")
    return "\n".join(lines)


def describe_mfeat(column: str) -> str:
    if column.startswith("PGD worst-view"):
        return f"l2-PGD, r={column.split()[-1]}, worst single view"
    if column == "missing worst view":
        return "worst single view missing"
    if column == "missing mean":
        return "one view missing (mean of 6)"
    return common.describe_column(column)


# --------------------------------------------------------------------------------------------------
# claims


def _d(a: Sequence[float], b: Sequence[float]) -> float:
    return 100 * (statistics.fmean(b) - statistics.fmean(a))


def _wins(a: Sequence[float], b: Sequence[float]) -> str:
    return f"{sum(1 for x, y in zip(a, b) if y > x)}/{min(len(a), len(b))}"


def claims(per_method: Mapping[str, Mapping[str, List[float]]], modalities: Sequence[str]) -> Tuple[str, Dict[str, bool], str]:
    """Markdown for the three claims on AV digits, {claim: holds} and a one-line summary."""
    lines: List[str] = []
    verdict: Dict[str, bool] = {}
    jt, crmt = per_method["JT"], per_method["CRMT-JT"]
    pct = lambda v: f"{100 * statistics.fmean(v):.1f}"  # noqa: E731

    radii = [x for x in common.TABLE_RADII if f"PGD {x:g}" in jt and f"PGD {x:g}" in crmt]
    # (1) modality preference of JT
    r = radii[-1]
    attack = {m: jt[f"PGD {m} {r:g}"] for m in modalities}
    missing = {m: jt[f"missing {m}"] for m in modalities}
    weak = min(modalities, key=lambda m: statistics.fmean(attack[m]))
    preferred = min(modalities, key=lambda m: statistics.fmean(missing[m]))
    verdict["1"] = weak == preferred
    lines.append(
        f"**(1) JT's modality preference — {'holds' if verdict['1'] else 'does not hold'}.** "
        f"An l2-PGD attack of radius {r:g} on one modality leaves JT "
        + ", ".join(f"{pct(attack[m])} % ({m} attacked)" for m in modalities)
        + "; with one modality missing JT keeps "
        + ", ".join(f"{pct(missing[m])} % ({m} missing)" for m in modalities)
        + f" (clean {pct(jt['clean'])} %). "
        + (f"Both point to **{preferred}**: JT leans on it, so attacking it is cheap and losing it is "
           f"catastrophic, while the other modality is under-trained."
           if verdict["1"] else f"The attack hurts most on {weak}, the absence on {preferred}.")
    )

    # (2) CRMT-JT vs JT
    checks = [f"PGD {x:g}" for x in radii] + [f"PGD {preferred} {x:g}" for x in radii]
    checks += [f"missing {m}" for m in modalities]
    rows = []
    ok = True
    for c in checks:
        d = _d(jt[c], crmt[c])
        ok = ok and d > 0
        rows.append(f"| {common.describe_column(c)} | {cell(jt[c])} | {cell(crmt[c])} | {d:+.1f} | {_wins(jt[c], crmt[c])} |")
    dclean = _d(jt["clean"], crmt["clean"])
    clean_ok = dclean >= -1.0
    verdict["2"] = ok and clean_ok
    failed = [c for c in checks if _d(jt[c], crmt[c]) <= 0]
    shaky = [c for c in checks if c not in failed and sum(1 for x, y in zip(jt[c], crmt[c]) if y > x) < len(crmt[c])]
    headline = "does not hold" if not verdict["2"] else ("holds on the means, weakly on part of it" if shaky else "holds")
    lines.append("")
    lines.append(
        f"**(2) CRMT-JT beats JT under joint PGD, under PGD on the preferred modality ({preferred}) and with "
        f"each modality missing, at clean accuracy within 1 point — {headline}.** "
        f"Clean: {cell(jt['clean'])} → {cell(crmt['clean'])} ({dclean:+.1f} points)."
        + (f" Not better on: {', '.join(common.describe_column(c) for c in failed)}." if failed else "")
        + (" Higher on average but not in every seed (a gain within seed-to-seed spread): "
           + ", ".join(f"{common.describe_column(c)} ({_d(jt[c], crmt[c]):+.1f} points, {_wins(jt[c], crmt[c])} seeds)"
                       for c in shaky) + "." if shaky else "")
    )
    lines.append("")
    lines.append("| test accuracy % | JT | CRMT-JT | Δ (points) | seeds where CRMT-JT is higher |")
    lines.append("|---|--:|--:|--:|--:|")
    lines += rows

    # (3) every CRMT variant vs its baseline
    lines.append("")
    robust = [c for c in crmt if c.startswith(("PGD", "FGM", "missing", "cert"))]
    lines.append(
        "**(3) Each CRMT variant beats its baseline in robust accuracy.** Δ = CRMT variant − baseline, in "
        "points (mean over seeds); the verdict asks for a higher mean under both joint PGD radii, and "
        "counts the robust columns (FGM, PGD, missing, certified) where the CRMT variant is higher."
    )
    lines.append("")
    header = ["pair", "Δ clean"] + [f"Δ {c}" for c in robust] + ["robust columns higher", "verdict"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["--:"] * (len(header) - 2) + ["---"]) + "|")
    notes: List[str] = []
    for base, var in PAIRS:
        b, v = per_method.get(METHODS[base]), per_method.get(METHODS[var])
        if not b or not v:
            continue
        deltas = {c: _d(b[c], v[c]) for c in robust if c in b and c in v}
        joint_ok = all(deltas.get(f"PGD {x:g}", -1) > 0 for x in radii)
        verdict[f"3 {METHODS[var]}"] = joint_ok
        higher = sum(1 for d in deltas.values() if d > 0)
        if not joint_ok or any(d < 0 for d in deltas.values()):
            worse = [c for c, d in deltas.items() if d < 0]
            notes.append(f"{METHODS[var]} is {'not ' if not joint_ok else ''}higher than {METHODS[base]} under joint "
                         f"PGD at every radius; lower on: " + ", ".join(f"{short(c)} ({deltas[c]:+.1f})" for c in worse)
                         + ".")
        lines.append("| " + " | ".join(
            [f"{METHODS[var]} vs {METHODS[base]}", f"{_d(b['clean'], v['clean']):+.1f}"]
            + [f"{deltas[c]:+.1f}" if c in deltas else "-" for c in robust]
            + [f"{higher}/{len(deltas)}", "holds" if joint_ok else "**does not hold**"]) + " |")
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    pairs = [k for k in verdict if k.startswith("3 ")]
    one_line = (
        f"On AV digits: claim (1) {'holds' if verdict['1'] else '**does not hold**'} (JT prefers {preferred}); "
        f"claim (2) {headline if verdict['2'] else '**does not hold**'}"
        + (f" (CRMT-JT's gain under attacks on {preferred} alone is within seed spread)" if shaky else "")
        + "; claim (3): " + ", ".join(f"{k[2:]} {'beats' if verdict[k] else '**does not beat**'} its baseline"
                                      for k in pairs)
        + " under joint PGD at every radius. Details and numbers below."
    )
    return "\n".join(lines), verdict, one_line


# --------------------------------------------------------------------------------------------------
# figures


def plot_certified(per_seed_rows: Mapping[str, List[List[Dict[str, Any]]]], modalities: Sequence[str], path: str,
                   title: str) -> str:
    """Certified accuracy vs radius (mean over seeds, band = min..max), one panel per baseline/CRMT pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    joint = "+".join(modalities)
    fig = Figure(figsize=(3.5 * len(PAIRS), 3.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PAIRS), squeeze=False)[0]
    for ax, pair in zip(axes, PAIRS):
        for i, script in enumerate(pair):
            label = METHODS[script]
            curves = [common.radius_curve(rows, "certified", joint) for rows in per_seed_rows.get(label, [])]
            if not curves:
                continue
            radii = curves[0][0]
            acc = [[100 * c[1][j] for c in curves] for j in range(len(radii))]
            ax.plot(radii, [statistics.fmean(a) for a in acc], marker="o", markersize=3, label=label,
                    color="C0" if i == 0 else "C3", linestyle="--" if i == 0 else "-")
            ax.fill_between(radii, [min(a) for a in acc], [max(a) for a in acc], alpha=0.15,
                            color="C0" if i == 0 else "C3")
        ax.set_xlabel("l2 radius (normalised units)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("certified accuracy % (empirical)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_bars(per_method: Mapping[str, Mapping[str, List[float]]], columns: Sequence[str], path: str, title: str,
              describe=None) -> str:
    """Grouped bars (mean, error bar = std over seeds) of the given columns, one panel per pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.8 * len(PAIRS), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PAIRS), squeeze=False, sharey=True)[0]
    x = list(range(len(columns)))
    for ax, pair in zip(axes, PAIRS):
        for i, script in enumerate(pair):
            cols = per_method.get(METHODS[script], {})
            stats = [mean_std(cols.get(c, [])) for c in columns]
            ax.bar([v + (i - 0.5) * 0.4 for v in x], [100 * s[0] for s in stats], width=0.4,
                   yerr=[100 * s[1] for s in stats], capsize=2, label=METHODS[script],
                   color="C0" if i == 0 else "C3", alpha=0.85)
        ax.set_xticks(x)
        ax.set_xticklabels([(describe or short)(c) for c in columns], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 115)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    axes[0].set_ylabel("test accuracy %")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def mfeat_sentence(per_method: Mapping[str, Mapping[str, List[float]]]) -> str:
    parts = []
    col, miss = f"PGD {common.TABLE_RADII[-1]:g}", "missing worst view"
    for base, var in PAIRS:
        b, v = per_method.get(METHODS[base]), per_method.get(METHODS[var])
        if b and v and col in b and col in v:
            parts.append(f"{METHODS[var]} − {METHODS[base]}: clean {_d(b['clean'], v['clean']):+.1f}, "
                         f"{short(col)} {_d(b[col], v[col]):+.1f}, {miss} {_d(b[miss], v[miss]):+.1f}")
    jt = per_method.get("JT", {})
    note = ""
    if "missing mean" in jt:
        note = (f" The six views are largely redundant: JT loses {_d(jt['missing mean'], jt['clean']):.1f} "
                "points on average when one view is missing, so there is little modality preference to correct.")
    return "Differences in points (mean over seeds): " + "; ".join(parts) + "." + note


# --------------------------------------------------------------------------------------------------
# investigation


def mean_a(runs: Mapping[str, Dict[str, Any]], label: str, seeds: Sequence[int]) -> Dict[str, float]:
    """Mean integration weight a^(m) per modality (over classes and seeds)."""
    values: Dict[str, List[float]] = {}
    for seed in seeds:
        m = runs.get(f"av/{label}/seed{seed}")
        for name, a in ((m or {}).get("integration_weights") or {}).items():
            values.setdefault(name, []).append(statistics.fmean(a))
    return {name: statistics.fmean(v) for name, v in values.items()}


def mean_tau(runs: Mapping[str, Dict[str, Any]], label: str, seeds: Sequence[int]) -> Dict[str, float]:
    """Mean empirical Lipschitz constant tau^(m) per modality (over classes and seeds)."""
    values: Dict[str, List[float]] = {}
    for seed in seeds:
        lip = (runs.get(f"av/{label}/seed{seed}") or {}).get("lipschitz") or {}
        for name, row in zip(lip.get("modalities", []), lip.get("values", [])):
            values.setdefault(name, []).append(statistics.fmean(row) if isinstance(row, list) else row)
    return {name: statistics.fmean(v) for name, v in values.items()}


def investigation(runs: Mapping[str, Dict[str, Any]], per_method: Mapping[str, Mapping[str, List[float]]],
                  seeds: Sequence[int], modalities: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Markdown lines of the investigation sections, and sentences for the summary."""
    out: List[str] = []
    findings: List[str] = []
    all_win, worst_missing = True, {}
    rows: Dict[str, Mapping[str, List[float]]] = {}
    notes: List[str] = []
    for label, (_, script, epochs) in ABLATIONS.items():
        longer = collect(runs, "av", label, seeds)
        crmt, base = METHODS[script], METHODS[dict((v, b) for b, v in PAIRS)[script]]
        if not longer or crmt not in per_method:
            continue
        rows[base], rows[crmt], rows[label] = per_method.get(base, {}), per_method[crmt], longer
        a0, a1 = mean_a(runs, crmt, seeds), mean_a(runs, label, seeds)
        r = max(x for x in common.TABLE_RADII if f"PGD {x:g}" in longer)
        changes = [f"PGD {r:g}", *[f"PGD {m} {r:g}" for m in modalities], *[f"missing {m}" for m in modalities]]
        changes = [c for c in changes if c in longer and c in per_method[crmt]]
        beats = [c for c in (f"PGD {x:g}" for x in common.TABLE_RADII) if c in longer and c in rows[base]]
        wins = all(_d(rows[base][c], longer[c]) > 0 for c in beats)
        all_win = all_win and wins
        worst_missing.update({f"{crmt} missing {m}": statistics.fmean(longer[f"missing {m}"]) for m in modalities
                              if f"missing {m}" in longer})
        tau = mean_tau(runs, crmt, seeds)
        notes.append(
            f"* **{crmt}** (mean empirical Lipschitz constant tau: "
            + ", ".join(f"{m} {tau.get(m, math.nan):.2f}" for m in modalities) + "): mean a "
            + ", ".join(f"{m} {a0.get(m, math.nan):.2f} → {a1.get(m, math.nan):.2f}" for m in modalities)
            + "; clean " + f"{_d(per_method[crmt]['clean'], longer['clean']):+.1f}, "
            + ", ".join(f"{short(c)} {_d(per_method[crmt][c], longer[c]):+.1f}" for c in changes)
            + f" points. Against {base} under joint PGD: "
            + ("higher at every radius" if wins else "not higher at every radius") + "."
        )
    if rows:
        out += [
            "", "### Investigation: step 2 (the integration weights a)", "",
            "The default runs spend a third of the step-1 epochs on step 2 (the reference's schedule). "
            "Step 2 maximises the mean certified joint radius, whose denominator grows with a^(m) times the "
            "Lipschitz constant of modality m; continuing it (20 more epochs on the cached logits, same "
            "step-1 model) shows where that objective leads. Changes relative to the default CRMT run:",
            "", *notes, "", table(rows),
        ]
        low = min(worst_missing, key=worst_missing.get) if worst_missing else None
        findings.append(
            "Running step 2 longer (20 more epochs) moves a towards the modality with the smaller Lipschitz "
            "constant; every CRMT variant then "
            + ("beats its baseline under joint PGD at every radius" if all_win else "still does not beat every baseline under joint PGD")
            + (f", but accuracy with that modality missing collapses (down to {100 * worst_missing[low]:.1f} %, {low})"
               if low else "") + ": the certified-radius objective of step 2 trades missing-modality robustness for "
            "attack robustness.")
    rho_rows = {label: collect(runs, "av", label, [0]) for label in TRADES_RHO}
    rho_rows = {k: v for k, v in rho_rows.items() if v}
    if rho_rows:
        reference = {k: collect(runs, "av", k, [0]) for k in ("TRADES", "CRMT-TRADES")}
        rows_ = {**reference, **rho_rows}
        col = f"PGD {common.TABLE_RADII[-1]:g}"
        ranked = ", ".join(f"{k} {100 * v[col][0]:.1f}" for k, v in rows_.items() if col in v)
        zero = rows_.get("CRMT-TRADES, rho 0", {}).get(col)
        positive = [v[col][0] for k, v in rho_rows.items() if k != "CRMT-TRADES, rho 0" and col in v]
        if zero and positive and "TRADES" in reference and col in reference["TRADES"]:
            trades_ = reference["TRADES"][col][0]
            findings.append(
                f"Under TRADES (seed 0) the CRMT head without the margin term (rho 0) reaches {100 * zero[0]:.1f} % "
                f"under joint PGD r={common.TABLE_RADII[-1]:g} (TRADES {100 * trades_:.1f} %), every tried margin "
                f"setting {100 * min(positive):.1f}-{100 * max(positive):.1f} %: there it is the margin term that "
                "costs attack robustness, while it is what buys the missing-modality robustness.")
        out += ["", "### Investigation: the margin term under TRADES (seed 0 only, one run each)", "",
                "CRMT-TRADES with rho 0 keeps the CRMT head (orthonormal rows, a, step 2) but drops the margin "
                "term, which separates the effect of the head from that of the regulariser; the default is rho 2, "
                f"temperature 10. Joint l2-PGD at r={common.TABLE_RADII[-1]:g}: {ranked}.", "",
                table(rows_)]
    return out, findings


# --------------------------------------------------------------------------------------------------
# the page


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, python {platform.python_version()}"


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["av", "mfeat"], choices=sorted(common.DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-ablations", action="store_true", help="skip the investigation runs")
    p.add_argument("--trades-rho", action="store_true",
                   help="also train CRMT-TRADES with rho 0, 0.5, 1, 4 and temperature 20 (seed 0; ~5 more minutes)")
    p.add_argument("--processes", type=int, default=2, help="parallel runs (one CPU thread each)")
    p.add_argument("--runs", default=os.path.join("runs", "results"), help="checkpoints and metrics.json")
    p.add_argument("--page", default=os.path.join(common.REPO, "docs", "results.md"))
    p.add_argument("--figures", default=os.path.join(common.REPO, "docs", "figures"))
    p.add_argument("--resume", action="store_true", help="reuse runs whose metrics.json exists")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags passed to every run (e.g. --extra --epochs 1 --limit 64 for a smoke test)")
    args = p.parse_args(argv)
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def out_dir(dataset: str, name: str, seed: int) -> str:
        return os.path.join(args.runs, dataset, name, f"seed{seed}")

    jobs = []
    for dataset in args.datasets:
        for script in args.methods:
            for seed in args.seeds:
                argv_ = _job_argv(dataset, seed, out_dir(dataset, script, seed), args.extra)
                jobs.append((f"{dataset}/{METHODS[script]}/seed{seed}", script, None, argv_))
    ablate = "av" in args.datasets and not args.no_ablations
    if ablate and args.trades_rho:
        for i, (label, (script, flags)) in enumerate(TRADES_RHO.items()):
            argv_ = _job_argv("av", 0, out_dir("av", f"trades_rho{i}", 0), [*flags, *args.extra])
            jobs.append((f"av/{label}/seed0", script, None, argv_))
    runs = run_all(jobs, args.processes, args.resume)
    if ablate:  # second phase: continue the finished CRMT runs' step 2
        jobs = []
        for i, (label, (_, script, epochs)) in enumerate(ABLATIONS.items()):
            if script not in args.methods:
                continue
            for seed in args.seeds:
                argv_ = _job_argv("av", seed, out_dir("av", f"step2_{script}", seed), args.extra)
                jobs.append((f"av/{label}/seed{seed}", script, (out_dir("av", script, seed), epochs), argv_))
        runs = run_all(jobs, args.processes, args.resume, runs)
    wall = time.time() - started

    os.makedirs(args.figures, exist_ok=True)
    figures_rel = os.path.relpath(args.figures, os.path.dirname(os.path.abspath(args.page)))
    reused = [m for m in runs.values() if "wall_seconds" not in m]  # loaded from metrics.json (--resume)
    d = vars(common.parse_args(__doc__, list(args.extra), crmt=True))  # the scripts' settings
    out: List[str] = [
        "# Results: CRMT vs its baselines on real multi-modal data",
        "",
        "Generated by `python examples/results.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
        + "` (this page and `docs/figures/results_*.png`; "
        f"{wall / 60:.1f} min wall clock for {len(runs) - len(reused)} runs on {args.processes} processes"
        + (f", {len(reused)} finished runs reused from `{args.runs}` (their own run time: "
           f"{sum(m['train_seconds'] + m['eval_seconds'] for m in reused) / 60:.1f} min)" if reused else "")
        + f"; {machine()}"
        + (f"; load average at start {load_before[0]:.1f}, other work was sharing the CPU" if load_before else "")
        + "). Do not edit by hand.",
        "",
        "**Protocol.** Every run is one example script (`examples/<method>.py`) with its defaults, seeds "
        f"{', '.join(map(str, args.seeds))} (model initialisation, shuffling and attack starts; the data split "
        f"is fixed, `--data-seed 0`). Adam (lr {d['lr']:g}, weight decay {d['weight_decay']:g}), batch "
        f"{d['batch_size']}; AV digits {common.DATASETS['av']['epochs']} epochs (`AVDigitsNet`), mfeat "
        f"{common.DATASETS['mfeat']['epochs']} epochs (`MultiViewMLP`); the checkpoint with the best "
        "**validation** accuracy is kept, every number below is on the **test** split (AV digits: 600 "
        f"audio-image pairs; mfeat: 400 digits). CRMT: rho {d['rho']:g}, relative margin, temperature "
        f"{d['temperature']:g}; after step 1, `estimate_lipschitz` on the training split and step 2 "
        f"(`fit_integration`, Adam lr {d['integration_lr']:g} on a) for a third of the step-1 epochs. "
        f"PGD-AT / TRADES: l2-PGD with one joint budget {d['train_eps']:g} over all modalities, "
        f"{d['train_steps']} steps, in eval mode (TRADES: beta {d['beta']:g}, the adversary maximises the "
        f"KL). Mixup: lambda ~ Beta({d['alpha']:g}, {d['alpha']:g}), every modality mixed with the same "
        "lambda and partner.",
        "",
        "**Evaluation** (`crmt_plugin.evaluation.evaluate_robustness`). Radii are l2 norms in normalised "
        "input units (audio: 13 MFCCs x 32 frames standardised per coefficient; image: 28 x 28 pixels "
        "standardised with one mean / std, valid range respected by the attacks; mfeat: standardised "
        "features). l2-PGD: 10 steps of 2.5 r / 10, random start, the worst iterate kept; on all modalities "
        "jointly (one budget) or on one modality alone. FGM: one step, all modalities. Missing: the modality "
        "replaced by its training-set mean. Certified: fraction of test samples whose certified joint l2 "
        "radius is >= r, from **empirical** Lipschitz constants (largest input-gradient norm of each "
        "uni-modal logit over the training split): an estimate, not a guarantee. Baselines are certified "
        "through their own linear head with the same formula (rows normalised, the norms as a). "
        "Cells: mean ± standard deviation over seeds, test accuracy in %. Columns: `PGD r=2 joint` = "
        "l2-PGD with radius 2 on all modalities at once; `PGD r=2 audio` = on the audio alone; "
        "`missing audio` = audio replaced by its training mean; `certified r=1` = certified accuracy at "
        "radius 1 (empirical); mfeat: `worst view` = the lowest accuracy over the six views.",
        "",
        "SUMMARY",
    ]
    verdicts: Dict[str, bool] = {}
    findings: List[str] = []
    one_line = ""
    for dataset in args.datasets:
        modalities = ("audio", "image") if dataset == "av" else ("fou", "fac", "kar", "pix", "zer", "mor")
        views = None if dataset == "av" else modalities
        per_method = {METHODS[s]: collect(runs, dataset, METHODS[s], args.seeds, views) for s in args.methods}
        per_method = {k: v for k, v in per_method.items() if v}
        name = "Audio-visual digits (audio + image)" if dataset == "av" else "UCI mfeat (six views)"
        out += ["", f"## {name}", ""]
        out.append(table(per_method))
        per_seed_rows = {METHODS[s]: [runs[f"{dataset}/{METHODS[s]}/seed{seed}"]["rows"] for seed in args.seeds
                                      if f"{dataset}/{METHODS[s]}/seed{seed}" in runs] for s in args.methods}
        cert_png = plot_certified(per_seed_rows, modalities, os.path.join(args.figures, f"results_{dataset}_certified.png"),
                                  f"{name}: certified accuracy vs radius (mean, min-max over seeds)")
        bar_columns = [c for c in next(iter(per_method.values())) if c.startswith(("PGD", "missing"))]
        bars_png = plot_bars(per_method, bar_columns, os.path.join(args.figures, f"results_{dataset}_robustness.png"),
                             f"{name}: robust accuracy (mean ± std over seeds)")
        out += ["", f"![robust accuracy]({figures_rel}/{os.path.basename(bars_png)})",
                "", f"![certified accuracy]({figures_rel}/{os.path.basename(cert_png)})"]
        if dataset == "av" and all(k in per_method for k in ("JT", "CRMT-JT")):
            text, verdicts, one_line = claims(per_method, modalities)
            out += ["", "### The paper's claims, checked", "", text]
        if dataset == "av" and not args.no_ablations:
            lines, findings = investigation(runs, per_method, args.seeds, modalities)
            out += lines
        if dataset != "av":
            out += ["", mfeat_sentence(per_method)]
    summary = ["## Summary", ""]
    if verdicts:
        summary.append(one_line)
    summary += [""] + [f"* {f}" for f in findings] if findings else []
    out[out.index("SUMMARY")] = "\n".join(summary)
    text = "\n".join(out) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.page)), exist_ok=True)
    with open(args.page, "w") as f:
        f.write(text)
    print(f"wrote {args.page} and figures in {args.figures} ({(time.time() - started) / 60:.1f} min)")
    return {"runs": runs, "verdicts": verdicts, "page": text}


if __name__ == "__main__":
    main()
