"""Sound vs empirical vs attacked accuracy of lip-jt / crmt-lip on one plot (docs/certification.md).

    python experiments/lipschitz_certification.py runs/lipschitz/av-r1 runs/lipschitz/av-r2 \\
        --out docs/figures/certification_lipschitz.png

Reads ``crmt-benchmark`` output folders (``results.json`` and ``<method>/seed<k>/model.pt``). For every saved
model of lip-jt / crmt-lip it certifies the test split on a grid of radii with the **sound** constants
(``crmt_plugin.bounds.encoder_bounds`` of the saved encoders, no declaration) and with **empirical** ones
(``estimate_lipschitz`` on the train split), through ``certifiable_copy`` (the saved model is the exported plain
model: the same function, and the same certificate, as the CRMT head). The attacked curves are the rows'
``curve`` (strong attack at the run's radius, the fast attack at the other radii); runs at several radii are merged.
Writes the figure and prints a markdown table (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from crmt_plugin.benchmark.data import batch_list, load_npz  # noqa: E402
from crmt_plugin.benchmark.evaluate import certifiable_copy  # noqa: E402
from crmt_plugin.bounds import encoder_bounds  # noqa: E402

METHODS = ("lip-jt", "crmt-lip")
GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def certified_curves(model, data, grid):
    """{"joint" | m: [fraction certified at each radius]} for sound and empirical constants."""
    wrapper = certifiable_copy(model)
    x, y = data.part("test")
    tx, ty = data.part("train")
    sound = encoder_bounds(wrapper.model.encoders, data.sample_shapes())
    empirical = wrapper.estimate_lipschitz(batch_list(tx, ty))
    out = {}
    for kind, lip in (("sound", sound), ("empirical", empirical)):
        cert = wrapper.certify(x, y, lipschitz=lip)
        curves = {"joint": cert.certified_accuracy(grid).tolist()}
        for m in data.modalities:
            curves[m] = cert.certified_accuracy(grid, modality=m).tolist()
        out[kind] = curves
    out["L"] = dict(zip(sound.modalities, sound.values.tolist()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="crmt-benchmark --out folders (lip-jt and/or crmt-lip)")
    p.add_argument("--out", default="docs/figures/certification_lipschitz.png")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    certified = defaultdict(list)          # (method, trained radius) -> [curves per saved model]
    attacked = defaultdict(lambda: defaultdict(list))   # (method, trained radius) -> panel -> [(r, acc)]
    modalities, data = None, None
    for run in args.runs:
        results = json.load(open(os.path.join(run, "results.json")))
        modalities = results["modalities"]
        data = data or load_npz(results["data"], data_seed=results.get("data_seed", 0))
        for row in results["rows"]:
            if row["method"] not in METHODS:
                continue
            series = (row["method"], float(results["radius"]))
            for panel, points in row["curve"].items():
                attacked[series][panel] += [tuple(p) for p in points]
            model = torch.load(os.path.join(run, row["model"]), weights_only=False).eval()
            certified[series].append(certified_curves(model, data, GRID))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["joint"] + list(modalities)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    lines = ["| method (trained at r) | constants | perturbed | " + " | ".join(f"{r:g}" for r in GRID) + " |",
             "|---|---|---|" + "|".join("--:" for _ in GRID) + "|"]
    for i, series in enumerate(sorted(certified, key=lambda s: (s[1], METHODS.index(s[0])))):
        method, trained_r = series
        name = f"{method} (r={trained_r:g})"
        color = f"C{i}"
        for ax, panel in zip(axes[0], panels):
            for kind, style in (("sound", "-"), ("empirical", "--")):
                curve = [statistics.fmean(c[kind][panel][j] for c in certified[series]) for j in range(len(GRID))]
                ax.plot(GRID, [100 * v for v in curve], style, color=color, label=f"{name} {kind} cert.")
                lines.append(f"| {name} | {kind} | {panel} | " + " | ".join(f"{100 * v:.1f}" for v in curve) + " |")
            pts = defaultdict(list)
            for r, a in attacked[series][panel]:
                pts[round(r, 6)].append(a)
            rs = sorted(pts)
            ax.plot(rs, [100 * statistics.fmean(pts[r]) for r in rs], ":", marker="o", markersize=3, color=color,
                    label=f"{name} attacked")
    for ax, panel in zip(axes[0], panels):
        ax.set_title("all modalities (joint budget)" if panel == "joint" else f"{panel} only", fontsize=10)
        ax.set_xlabel("l2 radius (the file's input units)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("\n".join(lines))
    for series, curves in certified.items():
        print(f"{series}: sound L per model: {[c['L'] for c in curves]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
