"""The small-data reference: the best of a small learning-rate / epoch / batch sweep of JT on BasicMotions.

    OMP_NUM_THREADS=1 python experiments/small_data_sweep.py            # -> experiments/results/small_data_sweep.json
    OMP_NUM_THREADS=1 python experiments/small_data_sweep.py --seeds 0 --lrs 1e-3 --epochs 100   # a smoke run

BasicMotions (``runs/benchmark-data/basicmotions.npz``, written by ``experiments/make_datasets.py --only
basicmotions``; the archive's 40 / 40 split, 8 train series as validation: 32 training samples) is the real
set with fewer than 100 training samples of issue 21's "Done when". Every configuration trains JT with the
benchmark's model and recipe (:func:`crmt_plugin.benchmark.recipes.train`: Adam, weight decay 1e-4, the epoch
of best validation accuracy restored) for exactly ``epochs`` epochs (``min_steps=0``), and reports the test
clean accuracy, mean over the seeds. The best configuration's mean is the reference that ``crmt-benchmark``'s
defaults for JT and CRMT-JT must come within 3 points of; the script also runs those defaults (``TrainConfig()``,
whatever the step budget rule is at the time) for ``jt`` and ``crmt-jt`` on the same seeds, for comparison.

Grid (the brief of issue 21's data helper): lr {1e-3, 3e-3, 1e-2} x epochs {100, 300, 1000} x batch size
{8, 16} x seeds {0, 1, 2}, one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from crmt_plugin.benchmark.data import load_npz  # noqa: E402
from crmt_plugin.benchmark.recipes import TrainConfig, accuracy_and_loss, train, training_schedule  # noqa: E402


def run(data, method: str, cfg: TrainConfig, seed: int) -> Dict[str, Any]:
    trained = train(method, data, cfg, seed)
    x, y = data.part("test")
    acc, _ = accuracy_and_loss(trained.model, x, y)
    return {"seed": seed, "test_accuracy": acc, "best_val": trained.best_val, "best_epoch": trained.best_epoch,
            "train_seconds": round(trained.train_seconds, 2)}


def summary(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    accs = [r["test_accuracy"] for r in rows]
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "min": min(accs), "max": max(accs)}


# crmt-benchmark's defaults now (TrainConfig()) and before issue 21 (a fixed 30 epochs of batch 64)
DEFAULTS = {"now": {}, "before-issue-21": {"epochs": 30, "batch_size": 64, "min_steps": 0}}


def run_defaults(data, seeds: Sequence[int]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label, kwargs in DEFAULTS.items():
        cfg = TrainConfig(**kwargs)
        schedule = training_schedule(data.sizes()["train"], cfg)
        for method in ("jt", "crmt-jt"):
            rows = [run(data, method, cfg, s) for s in seeds]
            out[f"{method} ({label})"] = {"config": kwargs, "schedule": dataclasses.asdict(schedule),
                                          "test_accuracy": summary(rows), "runs": rows}
            print(f"{method}, crmt-benchmark defaults {label} ({schedule}): test "
                  f"{100 * summary(rows)['mean']:.1f} ± {100 * summary(rows)['std']:.1f}", flush=True)
    return out


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "runs", "benchmark-data", "basicmotions.npz"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "small_data_sweep.json"))
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--epochs", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-defaults", action="store_true", help="skip the crmt-benchmark default runs")
    p.add_argument("--defaults-only", action="store_true",
                   help="run only the default configurations and merge them into an existing --out file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_npz(args.data)
    started = time.time()
    if args.defaults_only:
        with open(args.out) as f:
            result = json.load(f)
        result["defaults"] = run_defaults(data, args.seeds)
        result["defaults_command"] = "OMP_NUM_THREADS=1 python experiments/small_data_sweep.py " + " ".join(
            argv or sys.argv[1:])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return result
    configs = []
    for lr, epochs, batch in itertools.product(args.lrs, args.epochs, args.batch_sizes):
        cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=batch, min_steps=0, max_epochs=epochs)
        rows = [run(data, "jt", cfg, s) for s in args.seeds]
        entry = {"lr": lr, "epochs": epochs, "batch_size": batch, "steps": training_schedule(
            data.sizes()["train"], cfg).steps, "test_accuracy": summary(rows), "runs": rows}
        configs.append(entry)
        print(f"jt lr {lr:g} epochs {epochs} batch {batch}: test {100 * entry['test_accuracy']['mean']:.1f} "
              f"± {100 * entry['test_accuracy']['std']:.1f} (" + ", ".join(f"{r['test_accuracy']:.3f}" for r in rows)
              + ")",
              flush=True)
    best = max(configs, key=lambda c: c["test_accuracy"]["mean"])
    defaults = {} if args.no_defaults else run_defaults(data, args.seeds)
    result = {
        "data": os.path.relpath(args.data, REPO), "sizes": data.sizes(), "seeds": args.seeds,
        "command": "OMP_NUM_THREADS=1 python experiments/small_data_sweep.py " + " ".join(argv or sys.argv[1:]),
        "protocol": "JT, benchmark model and recipe, exactly `epochs` epochs (min_steps=0), best-validation epoch "
                    "restored, test clean accuracy mean over seeds; one torch thread",
        "configs": configs,
        "best": {k: best[k] for k in ("lr", "epochs", "batch_size", "steps", "test_accuracy")},
        "defaults": defaults,
        "seconds": round(time.time() - started, 1), "torch": torch.__version__, "platform": platform.platform(),
    }
    print(f"best: lr {best['lr']:g}, {best['epochs']} epochs, batch {best['batch_size']}: test "
          f"{100 * best['test_accuracy']['mean']:.1f} ± {100 * best['test_accuracy']['std']:.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
