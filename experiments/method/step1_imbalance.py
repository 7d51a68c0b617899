"""Step 1 on imbalanced modality pairs: which margin regulariser keeps JT's clean accuracy?

    OMP_NUM_THREADS=1 python experiments/method/step1_imbalance.py --data mor+fac fou+zer pix+fac \
        --variants jt rel2 raw2 ... --seeds 0 1 2 --out experiments/method/results/step1.jsonl

Each variant is a per-sample margin term on the uni-modal logits (see VARIANTS); the loss is
CE(h, y) + rho(t) * term. One JSON line per (data, variant, seed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
import torch.nn.functional as F

import common
import crmt_plugin


def _diff(out, y, margin: str, temperature: float):
    """(B, M, K) scaled z_k - z_y (label column -inf) and the scaled uni-modal logits."""
    z = torch.stack(list(out.unimodal.values()), dim=1)
    if margin == "relative":
        norms = torch.stack([f.norm(dim=-1) for f in out.features.values()], dim=1).clamp_min(1e-12)
        z = z * (temperature / norms).unsqueeze(-1)
    idx = y.view(-1, 1, 1).expand(z.shape[0], z.shape[1], 1)
    d = (z - z.gather(2, idx)).scatter(2, idx, float("-inf"))
    return d, z


def term(out, y, *, margin="relative", temperature=10.0, where="all", target=None, combine="lse", cap=None,
         kind="lse"):
    d, z = _diff(out, y, margin, temperature)
    if kind == "perr":  # bounded: each modality's probability of error under its own scaled logits
        p = torch.softmax(z, dim=2).gather(2, y.view(-1, 1, 1).expand(z.shape[0], z.shape[1], 1)).squeeze(2)
        return (1 - p).sum(1).mean()
    if kind == "ramp_m":  # per-modality ramp clamp(lse_k + target, 0, cap), summed over modalities
        per = torch.logsumexp(d, dim=2)
        return (per + target).clamp(0, cap).sum(1).mean()
    if where == "correct":  # only modalities that classify the sample correctly themselves
        ok = (z.argmax(2) == y.unsqueeze(1)).detach()  # (B, M)
        d = d.masked_fill(~ok.unsqueeze(-1), float("-inf"))
    elif where == "confidence":  # weight by the modality's own probability of the label
        p = torch.softmax(z.detach(), dim=2).gather(2, y.view(-1, 1, 1).expand(z.shape[0], z.shape[1], 1))
        d = d + p.clamp_min(1e-12).log()
    if where in ("fused_conf", "fused_correct"):  # weight each sample by the fused model's own view of it
        fused = out.logits.detach()
        if where == "fused_conf":
            w = torch.softmax(fused, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        else:
            w = (fused.argmax(1) == y).to(fused.dtype)
    else:
        w = None
    if combine == "lse":
        per = torch.logsumexp(d.flatten(1), dim=1)
    else:  # mean over modalities of per-modality lse
        per = torch.logsumexp(d, dim=2)
        per = torch.where(torch.isinf(per), torch.zeros_like(per), per).mean(1)
    per = torch.where(torch.isinf(per), torch.zeros_like(per), per)
    if target is not None:
        per = F.relu(per + target)  # hinge: stop once the smooth-min margin exceeds `target`
    if cap is not None:
        per = per.clamp_max(cap)  # ramp: no push where the margin is hopeless
    if w is not None:
        per = per * w
    return per.mean()


def make_loss(rho, warmup=0.0, **kw):
    def loss(out, y, t):
        r = rho * min(1.0, t / warmup) if warmup > 0 else rho
        return F.cross_entropy(out.logits, y) + r * term(out, y, **kw)
    return loss


def library_loss(**kw):
    return lambda out, y, t: crmt_plugin.crmt_loss(out, y, **kw)


VARIANTS = {
    "jt": None,
    "head": make_loss(0.0),                                  # CRMT head, no margin term
    "rel2": make_loss(2.0),                                  # the current default (relative, T = 10, rho 2)
    "raw2": make_loss(2.0, margin="raw"),                    # the paper
    "rel0.5": make_loss(0.5),
    "rel2_warm": make_loss(2.0, warmup=0.5),
    "rel2_correct": make_loss(2.0, where="correct"),
    "rel2_conf": make_loss(2.0, where="confidence"),
    "rel2_hinge2": make_loss(2.0, target=-2.0),              # stop at smooth-min relative margin 2
    "rel2_mmean": make_loss(2.0, combine="mean"),
    "rel2_correct_hinge2": make_loss(2.0, where="correct", target=-2.0),
    "rel1_correct": make_loss(1.0, where="correct"),
    "rel2_conf_hinge2": make_loss(2.0, where="confidence", target=-2.0),
    "rel2_ramp2_4": make_loss(2.0, target=-2.0, cap=4.0),
    "rel2_ramp2_8": make_loss(2.0, target=-2.0, cap=8.0),
    "rel2_rampm2_4": make_loss(2.0, kind="ramp_m", target=-2.0, cap=4.0),
    "rel2_rampm2_8": make_loss(2.0, kind="ramp_m", target=-2.0, cap=8.0),
    "perr2": make_loss(2.0, kind="perr"),
    "perr5": make_loss(5.0, kind="perr"),
    "rel2_T3": make_loss(2.0, temperature=3.0),
    "rel2_hinge4": make_loss(2.0, target=-4.0),
    "rel2_fconf": make_loss(2.0, where="fused_conf"),
    "rel2_fcorrect": make_loss(2.0, where="fused_correct"),
    "rel2_fconf_hinge2": make_loss(2.0, where="fused_conf", target=-2.0),
    "rel1_fconf": make_loss(1.0, where="fused_conf"),
    "rel1_hinge2": make_loss(1.0, target=-2.0),
    "rel0.5_hinge2": make_loss(0.5, target=-2.0),
    "rel2_hinge0": make_loss(2.0, target=0.0),
    "perr1": make_loss(1.0, kind="perr"),
    "perr1.5": make_loss(1.5, kind="perr"),
    "lib_hinge0.5": library_loss(rho=0.5, penalty="hinge", margin_target=1.0),
    "lib_sig1": library_loss(rho=1.0, penalty="sigmoid"),
    "lib_hinge0.25": library_loss(rho=0.25, penalty="hinge", margin_target=1.0),
    "lib_hinge0.1": library_loss(rho=0.1, penalty="hinge", margin_target=1.0),
    "lib": library_loss(),                                   # whatever crmt_loss's defaults are now
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", default=["mor+fac", "fou+zer", "pix+fac"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--av-epochs", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="experiments/method/results/step1.jsonl")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for data in args.data:
        splits = common.load(data, seed=0)
        epochs = args.av_epochs if data == "av" else args.epochs
        radius_file = out.parent / f"radius_{data}.json"
        if radius_file.exists():
            eps = json.loads(radius_file.read_text())["radius"]
        else:
            jt, _ = common.train(data, splits, None, seed=0, epochs=epochs)
            eps = common.pick_radius(jt, splits, steps=args.steps, limit=common.TEST_LIMIT.get(data))
            radius_file.write_text(json.dumps({"radius": eps}))
        for variant in args.variants:
            for seed in args.seeds:
                t0 = time.time()
                model, crmt = common.train(data, splits, VARIANTS[variant], seed=seed, epochs=epochs)
                row = common.evaluate(model, splits, eps, crmt=crmt, steps=args.steps, seed=seed,
                                      limit=common.TEST_LIMIT.get(data))
                row.update(data=data, variant=variant, seed=seed, eps=eps, seconds=round(time.time() - t0, 1))
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{data:8s} {variant:22s} s{seed} clean {row['clean']:.3f} robust {row['robust_mean']:.3f} "
                      f"({row['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
