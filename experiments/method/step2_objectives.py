"""Step 2 (fit_integration) objectives and accuracy tolerance, after the default step 1.

    OMP_NUM_THREADS=1 python experiments/method/step2_objectives.py --data mor+fac fou+zer pix+fac \
        --seeds 0 1 2 --out experiments/method/results/step2.jsonl

For each (data, seed): step 1 with the library's default crmt_loss, then step 2 from the same
state with each configuration in CONFIGS (objective, validation loader or not, tolerance);
test-split evaluation as in step1_imbalance.py. One JSON line per (data, seed, config).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
import warnings

import torch

import common
import crmt_plugin

CONFIGS = {
    "step1": None,  # no step 2
    # unconstrained, on the training data: what step 2 did before (the paper's objective)
    "paper": dict(objective="mean_radius", accuracy_tolerance=math.inf, val=False, protect_missing=False),
    "mean_radius": dict(objective="mean_radius", accuracy_tolerance=0.005, val=True),
    "balanced": dict(objective="balanced", accuracy_tolerance=0.005, val=True),
    "mix": dict(objective="mix", accuracy_tolerance=0.005, val=True),
    "mean_radius_noprotect": dict(objective="mean_radius", accuracy_tolerance=0.005, val=True, protect_missing=False),
    "balanced_noprotect": dict(objective="balanced", accuracy_tolerance=0.005, val=True, protect_missing=False),
    "balanced_tol0": dict(objective="balanced", accuracy_tolerance=0.0, val=True),
    "balanced_tol1": dict(objective="balanced", accuracy_tolerance=0.01, val=True),
    "balanced_noval": dict(objective="balanced", accuracy_tolerance=0.005, val=False),
    "balanced_inf": dict(objective="balanced", accuracy_tolerance=math.inf, val=True),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", default=["mor+fac", "fou+zer", "pix+fac"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--av-epochs", type=int, default=12)
    p.add_argument("--step2-epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rho", type=float, default=None, help="step-1 rho (default: the library's)")
    p.add_argument("--penalty", default=None, help="step-1 penalty (default: the library's)")
    p.add_argument("--out", default="experiments/method/results/step2.jsonl")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for data in args.data:
        splits = common.load(data, seed=0)
        epochs = args.av_epochs if data == "av" else args.epochs
        eps = json.loads((out.parent / f"radius_{data}.json").read_text())["radius"]
        train_b = [common.tensors(splits.train)]
        val_b = [common.tensors(splits.val)]
        fill = {k: v.mean(0) for k, v in splits.train.tensors.items()}  # the evaluation's train-mean fill
        for seed in args.seeds:
            kw = {k: v for k, v in (("rho", args.rho), ("penalty", args.penalty)) if v is not None}
            model, crmt = common.train(data, splits, lambda o, y, t: crmt_plugin.crmt_loss(o, y, **kw), seed=seed,
                                       epochs=epochs)
            lip = crmt.estimate_lipschitz(train_b)
            state = {k: v.clone() for k, v in crmt.state_dict().items()}
            for name in args.configs:
                cfg = CONFIGS[name]
                crmt.load_state_dict(state)
                t0 = time.time()
                extra = {}
                if cfg is not None:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        res = crmt.fit_integration(train_b, lipschitz=lip, val_loader=val_b if cfg["val"] else None,
                                                   objective=cfg["objective"], epochs=args.step2_epochs,
                                                   accuracy_tolerance=cfg["accuracy_tolerance"],
                                                   protect_missing=cfg.get("protect_missing", True),
                                                   missing_fill=fill,
                                                   generator=torch.Generator().manual_seed(seed))
                    extra = dict(best_epoch=res.best_epoch, rejected=len(res.rejected_epochs),
                                 stopped_early=res.stopped_early, warned=len(caught),
                                 train_acc_before=res.accuracy_before, train_acc_after=res.accuracy_after)
                row = common.evaluate(model, splits, eps, crmt=crmt, steps=args.steps, seed=seed,
                                      limit=common.TEST_LIMIT.get(data))
                row.update(extra, data=data, config=name, step1=kw, seed=seed, eps=eps,
                           seconds=round(time.time() - t0, 1))
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{data:8s} {name:16s} s{seed} clean {row['clean']:.3f} robust {row['robust_mean']:.3f} "
                      f"radius {row['radius']:.3f} {extra}", flush=True)


if __name__ == "__main__":
    main()
