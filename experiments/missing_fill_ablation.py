"""Ablation of ``crmt.missing_fill_loss``: each CRMT recipe trained without and with it, the same seed.

    OMP_NUM_THREADS=1 python experiments/missing_fill_ablation.py   # -> experiments/results/missing_fill_ablation.json
    OMP_NUM_THREADS=1 python experiments/missing_fill_ablation.py --runs watch:crmt-jt:0   # one cell

Every cell trains ``method`` with :func:`crmt_plugin.benchmark.recipes.train` and the benchmark's defaults at a
fixed rho (``TrainConfig()``: the library's rho = 0.5, no validation selection, so that the two arms differ only by
the term), once with ``missing_fill_weight=0`` and once with ``1``, and reports on the test split, with no attack:
clean accuracy; accuracy with each modality missing (replaced by the train mean, the benchmark's protocol);
accuracy with each modality's contribution *dropped* from the fused logits (h - W^(m) phi^(m), on the exported
plain model), which is what the term makes the missing accuracy approach. JT is run with weight 0 only, for its
dropped-modality accuracy: the most the same term could give a plain head. Data: ``runs/benchmark-data/*.npz``
(``python experiments/make_datasets.py``). The training PGD budget of AT / TRADES is the matrix's radius of the set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from crmt_plugin.benchmark.data import load_npz  # noqa: E402
from crmt_plugin.benchmark.recipes import TrainConfig, train  # noqa: E402

# data set -> the matrix's evaluation radius (docs/results.md), the training budget of AT / TRADES
RADIUS = {"watch": 1.04, "basicmotions": 2.95, "segment": 0.49, "fou-zer": 1.37, "mor-fac": 1.98}
DEFAULT_RUNS = ("watch:crmt-jt:0,1,2", "watch:crmt-trades:0,1", "watch:crmt-at:0", "watch:jt:0,1,2",
                "basicmotions:crmt-jt:0,1", "basicmotions:crmt-trades:0", "segment:crmt-jt:0,1",
                "fou-zer:crmt-jt:0,1", "mor-fac:crmt-jt:0")


def scores(model, data) -> Dict[str, float]:
    """Clean, missing-by-fill and dropped-contribution accuracy (%) of a plain BenchmarkNet on the test split."""
    x, y = data.part("test")
    means = data.train_mean()
    model = model.eval()
    with torch.no_grad():
        def acc(logits):
            return 100 * float((logits.argmax(1) == y).float().mean())
        feats = [model.encoders[n](x[n]) for n in model.modalities]
        full = model.fusion(torch.cat(feats, 1))
        row = {"clean": acc(full)}
        for n in model.modalities:
            filled = dict(x)
            filled[n] = means[n].expand_as(x[n])
            row[f"missing:{n}"] = acc(model(**filled))
        blocks = torch.split(model.fusion.weight, [f.shape[1] for f in feats], dim=1)
        for n, f, block in zip(model.modalities, feats, blocks):
            row[f"dropped:{n}"] = acc(full - f @ block.T)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="data:method:seeds cells")
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "benchmark-data"))
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "missing_fill_ablation.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: List[dict] = []
    for cell in args.runs:
        name, method, seeds = cell.split(":")
        data = load_npz(os.path.join(args.data_dir, f"{name}.npz"))
        for seed in (int(s) for s in seeds.split(",")):
            for weight in ((0.0,) if method == "jt" else (0.0, 1.0)):
                started = time.time()
                cfg = TrainConfig(missing_fill_weight=weight, train_eps=RADIUS.get(name, 1.0))
                row = {"data": name, "method": method, "seed": seed, "weight": weight,
                       **scores(train(method, data, cfg, seed).model, data), "seconds": time.time() - started}
                rows.append(row)
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print("| data | recipe | seeds | weight 0: clean / missing | weight 1: clean / missing |")
    print("|---|---|--:|---|---|")
    for cell in args.runs:
        name, method, _ = cell.split(":")
        cells = []
        for weight in (0.0, 1.0):
            sel = [r for r in rows if r["data"] == name and r["method"] == method and r["weight"] == weight]
            if not sel:
                cells.append("–")
                continue
            keys = ["clean"] + [k for k in sel[0] if k.startswith("missing:")]
            cells.append(" / ".join(f"{statistics.mean(r[k] for r in sel):.1f}" for k in keys))
        count = len({r["seed"] for r in rows if r["data"] == name and r["method"] == method})
        print(f"| {name} | {method} | {count} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
