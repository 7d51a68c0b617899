"""CRMT-AT / CRMT-TRADES variants against their baselines, on the benchmark's data files and models.

    OMP_NUM_THREADS=1 python experiments/adversarial/variants.py --data av --variants trades,crmt-trades \\
        --seeds 0 1 --epochs 8 --out experiments/adversarial/results/av.jsonl

Training mirrors ``crmt_plugin.benchmark.recipes.train`` (same model, Adam 1e-3 / wd 1e-4, batch 64, l2
PGD-3 training attack with budget = the evaluation radius, best-validation epoch, then step 2 with the
validation split); a variant changes one knob (see VARIANTS). Evaluation on the test split (first
``--max-test``): clean; ``joint`` = library ``strong_attack`` (APGD-CE, APGD-DLR, APGD-T-DLR, APGD-T-CW;
``--eval-steps`` steps) on all modalities; ``pgd:<m>`` the same on one modality; ``missing:<m>`` train-mean
fill; ``mean_robust`` = mean(joint, pgd:*, missing:*) (the benchmark's, without the Square member).
Diagnostics of the training attack (on 256 training samples, selected model): accuracy / KL under the
training attack vs under the strong attack at the training budget, and the fused-logit scale.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crmt_plugin  # noqa: E402
from crmt_plugin import attacks  # noqa: E402
from crmt_plugin.benchmark.data import batch_list, batches, load_npz  # noqa: E402
from crmt_plugin.benchmark.recipes import accuracy, new_model  # noqa: E402

LOSS_MD5 = __import__("hashlib").md5(open(crmt_plugin.loss.__file__, "rb").read()).hexdigest()[:8]
DATA = {"av": 1.5, "mor-fac": 2.0, "fou-zer": 1.5, "pix-fac": 3.0,  # radius (experiments/method/results)
        "av-noisy": 1.13, "fou-kar-mor": 1.97}  # the matrix radii (docs/results.md)

# name -> knobs. base: at | trades; head: plain | crmt; rho: None = library default;
# margin_on: adv | clean | both (crmt only); attack: loss of the training attack;
# kl_temp: TRADES KL on logits / T; step2: run fit_integration.
BASE = dict(base="trades", head="crmt", rho=None, margin_on="adv", attack=None, step2=True, kl_temp=None,
            kl_norm=None, beta=6.0, ukl=0.0, a_lr=1.0, penalty=None, gscale=0.0, sdecay=0.0,
            margin_target=None)
VARIANTS = {
    "jt": dict(base="jt", head="plain", attack="ce"),
    "crmt-jt": dict(base="jt", attack="ce"),
    "pgd-at": dict(base="at", head="plain", attack="ce"),
    "crmt-at": dict(base="at", attack="ce"),
    "crmt-at-dlr": dict(base="at", attack="dlr"),
    "crmt-at-cw": dict(base="at", attack="cw"),
    "crmt-at-nostep2": dict(base="at", attack="ce", step2=False),
    "crmt-at-rho0": dict(base="at", attack="ce", rho=0.0),
    "trades": dict(head="plain", attack="kl"),
    "crmt-trades": dict(attack="kl"),
    "crmt-trades-nostep2": dict(attack="kl", step2=False),
    "crmt-trades-rho0": dict(attack="kl", rho=0.0),
    "crmt-trades-rho0.5": dict(attack="kl", rho=0.5),
    "crmt-trades-clean": dict(attack="kl", margin_on="clean"),
    "crmt-trades-both": dict(attack="kl", margin_on="both"),
    "crmt-trades-dlr": dict(attack="dlr"),   # adversary from DLR (label-based) instead of the KL
    "crmt-trades-cw": dict(attack="cw"),
}


def parse_variant(name):
    """A VARIANTS name, optionally with ``:key=value`` overrides (e.g. crmt-trades:rho=1:step2=0)."""
    parts = name.split(":")
    knobs = dict(BASE)
    knobs.update(VARIANTS[parts[0]])
    for part in parts[1:]:
        key, value = part.split("=")
        old = knobs[key]
        if isinstance(old, bool):
            knobs[key] = value not in ("0", "false", "False")
        elif key in ("rho", "kl_temp", "kl_norm", "beta", "ukl", "a_lr", "gscale", "sdecay", "margin_target"):
            knobs[key] = None if value == "none" else float(value)
        else:
            knobs[key] = value
    return knobs


def kl(adv_logits, clean_logits, temp=None, norm=None):
    """TRADES KL; ``temp``: both logits / temp; ``norm``: both logits scaled per sample so that the clean
    logits' std over classes is ``norm`` (detached scale: the KL no longer falls when the head shrinks)."""
    if temp:
        adv_logits, clean_logits = adv_logits / temp, clean_logits / temp
    if norm:
        scale = norm / clean_logits.detach().std(1, keepdim=True).clamp_min(1e-6)
        adv_logits, clean_logits = adv_logits * scale, clean_logits * scale
    return F.kl_div(F.log_softmax(adv_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")


def make_attack(knobs, eps, steps, gen):
    loss = {"kl": attacks.trades_kl_loss, "ce": "ce", "dlr": "dlr", "cw": "cw"}[knobs["attack"]]
    return attacks.PGD(eps, norm="l2", steps=steps, generator=gen, loss=loss)


def train(knobs, data, seed, epochs, eps, steps=3, batch_size=64):
    beta = knobs["beta"]
    torch.manual_seed(seed)
    model = new_model(data)
    crmt = None
    if knobs["head"] == "crmt":
        # gscale=0: the paper's head, no shared scale (the wrapper's default has it, gain 1)
        scale = {"shared_scale": True, "scale_gain": knobs["gscale"]} if knobs["gscale"] else {"shared_scale": False}
        crmt = crmt_plugin.CRMTWrapper(model, head="fusion", modalities=model.feature_dims, **scale)
    a_params = [p for n, p in model.named_parameters() if "integration" in n]
    rest = [p for n, p in model.named_parameters() if "integration" not in n]
    groups = [{"params": rest}] + ([{"params": a_params, "lr": 1e-3 * knobs["a_lr"]}] if a_params else [])
    opt = torch.optim.Adam(groups, lr=1e-3, weight_decay=1e-4)
    gen, agen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    attack = make_attack(knobs, eps, steps, agen)
    tx, ty = data.part("train")
    vx, vy = data.part("validation")
    rho_kw = {} if knobs["rho"] is None else {"rho": knobs["rho"]}
    rho = knobs["rho"] if knobs["rho"] is not None else getattr(crmt_plugin.loss, "DEFAULT_RHO", 2.0)

    pen_kw = {} if knobs["penalty"] is None else {"penalty": knobs["penalty"]}
    if knobs["margin_target"] is not None:
        pen_kw["margin_target"] = knobs["margin_target"]

    def margin(out, y):
        return crmt_plugin.margin_loss(out, y, **pen_kw)

    def step_loss(x, y):
        if knobs["base"] == "jt":
            if crmt is None:
                return F.cross_entropy(model(**x), y)
            return crmt_plugin.crmt_loss(crmt(x), y, **rho_kw, **pen_kw)
        if knobs["base"] == "at":
            adv = attack(model, x, y)
            if crmt is None:
                return F.cross_entropy(model(**adv), y)
            out = crmt(adv)
            if knobs["margin_on"] == "adv":
                return crmt_plugin.crmt_loss(out, y, **rho_kw, **pen_kw)
            clean = crmt(x)
            return F.cross_entropy(out.logits, y) + rho * margin(clean, y)
        # TRADES
        if crmt is None:
            logits = model(**x)
        else:
            out = crmt(x)
            logits = out.logits
        target = logits.detach() if knobs["attack"] == "kl" else y
        adv = attack(model, x, target)
        if crmt is None:
            return F.cross_entropy(logits, y) + beta * kl(model(**adv), logits, knobs["kl_temp"], knobs["kl_norm"])
        out_adv = crmt(adv)
        loss = F.cross_entropy(logits, y) + beta * kl(out_adv.logits, logits, knobs["kl_temp"], knobs["kl_norm"])
        if knobs["ukl"]:  # uni-modal TRADES: each modality's share a^(m) z^(m) of the fused logits stays put
            a = crmt.head.integration_weights()
            for i, m in enumerate(out.unimodal):
                loss = loss + beta * knobs["ukl"] * kl(a[i] * out_adv.unimodal[m], a[i] * out.unimodal[m])
        if rho == 0:
            return loss
        if knobs["margin_on"] in ("adv", "both"):
            loss = loss + rho * margin(out_adv, y)
        if knobs["margin_on"] in ("clean", "both"):
            loss = loss + rho * margin(out, y)
        return loss

    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in batches(tx, ty, batch_size, shuffle=True, generator=gen):
            if y.shape[0] < 2:
                continue
            loss = step_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if knobs["sdecay"] and crmt is not None:  # the decay a plain head gets: d/dtau of (wd/2) ||a W~||^2
                with torch.no_grad():
                    a = crmt.head.integration_weights()
                    crmt.head.log_scale.grad += knobs["sdecay"] * 1e-4 * knobs["gscale"] * a.square().sum()
            opt.step()
        val = accuracy(model, vx, vy)
        if val > best:
            best, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()
    info = {"best_val": best, "best_epoch": best_epoch}
    diag = diagnostics(model, knobs, data, eps, steps, seed)
    if crmt is not None:
        a = crmt.head.integration_weights().detach().mean(1)
        diag.update({f"a:{m}": float(v) for m, v in zip(crmt.modalities, a)})
    if crmt is not None and knobs["step2"]:
        loader, vloader = batch_list(tx, ty), batch_list(vx, vy)
        lip = crmt.estimate_lipschitz(loader)
        fill = {n: m.expand(data.x[n].shape[1:]).clone() for n, m in data.train_mean().items()}
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = crmt.fit_integration(loader, lipschitz=lip, val_loader=vloader, missing_fill=fill,
                                       generator=torch.Generator().manual_seed(seed + 7))
        info["step2_best_epoch"] = res.best_epoch
    plain = crmt.export().eval() if crmt is not None else model
    return plain, info, diag


def diagnostics(model, knobs, data, eps, steps, seed, n=256):
    """Strength of the training attack on the trained model, vs the strong attack at the same budget."""
    x, y = data.part("train")
    x, y = {k: v[:n] for k, v in x.items()}, y[:n]
    with torch.no_grad():
        clean = model(**x)
    attack = make_attack(knobs, eps, steps, torch.Generator().manual_seed(seed + 5))
    adv = attack(model, x, clean if knobs["attack"] == "kl" else y)
    with torch.no_grad():
        adv_logits = model(**adv)
    strong = attacks.strong_attack(eps, steps=20, restarts=1, targets=2, generator=torch.Generator().manual_seed(3))
    sadv = strong(model, x, y)
    with torch.no_grad():
        s_logits = model(**sadv)
    kl_strong_ce = attacks.PGD(eps, norm="l2", steps=20, loss=attacks.trades_kl_loss,
                               generator=torch.Generator().manual_seed(4))(model, x, clean)
    with torch.no_grad():
        kl20 = attacks.trades_kl_loss(model(**kl_strong_ce), clean).mean()
    return {"train_clean": float((clean.argmax(1) == y).double().mean()),
            "train_adv_acc": float((adv_logits.argmax(1) == y).double().mean()),
            "train_strong_acc": float((s_logits.argmax(1) == y).double().mean()),
            "train_adv_kl": float(attacks.trades_kl_loss(adv_logits, clean).mean()),
            "kl_pgd20": float(kl20),
            "logit_std": float(clean.std(1).mean()),
            "logit_gap": float((clean.max(1).values - clean.median(1).values).mean())}


def evaluate(model, data, eps, max_test, steps, seed):
    x, y = data.part("test")
    if max_test:
        x, y = {k: v[:max_test] for k, v in x.items()}, y[:max_test]
    for p in model.parameters():
        p.requires_grad_(False)

    def ok(attack_mods):
        a = attacks.strong_attack(eps, modalities=attack_mods, steps=steps, restarts=1, targets=2,
                                  generator=torch.Generator().manual_seed(seed + 11))
        out = []
        for xb, yb in batches(x, y, 300):
            adv = a(model, xb, yb)
            with torch.no_grad():
                out.append(model(**adv).argmax(1) == yb)
        return torch.cat(out)

    with torch.no_grad():
        clean = model(**x).argmax(1) == y
    row = {"clean": float(clean.double().mean()), "joint": float((ok(None) & clean).double().mean())}
    for m in data.modalities:
        row[f"pgd:{m}"] = float((ok((m,)) & clean).double().mean())
    means = data.train_mean()
    for m in data.modalities:
        filled = dict(x)
        filled[m] = means[m].expand_as(x[m])
        with torch.no_grad():
            row[f"missing:{m}"] = float((model(**filled).argmax(1) == y).double().mean())
    keys = ["joint"] + [f"pgd:{m}" for m in data.modalities] + [f"missing:{m}" for m in data.modalities]
    row["mean_robust"] = sum(row[k] for k in keys) / len(keys)
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="av")
    p.add_argument("--variants", default="trades,crmt-trades")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--radius", type=float, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_npz(os.path.join(REPO, "runs", "benchmark-data", args.data + ".npz"))
    eps = args.radius or DATA[args.data]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in args.variants.split(","):
        knobs = parse_variant(name)
        for seed in args.seeds:
            t0 = time.time()
            model, info, diag = train(knobs, data, seed, args.epochs, eps)
            t1 = time.time()
            row = evaluate(model, data, eps, args.max_test, args.eval_steps, seed)
            row.update(info)
            row.update(diag)
            row.update(loss_md5=LOSS_MD5, data=args.data, variant=name, seed=seed, eps=eps, epochs=args.epochs,
                       train_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
