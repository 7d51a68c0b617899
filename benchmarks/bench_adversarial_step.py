"""Benchmark 6: one PGD-AT training step (3-step l-inf PGD on both modalities, then a training step
on the adversarial batch) with the CRMT head vs the plain nn.Linear head; the W~ cache before/after.

    python benchmarks/bench_adversarial_step.py --against e8c7a4a --retraction
    python benchmarks/bench_adversarial_step.py --quick

A step: model.eval(); delta ~ U(-eps, eps); 3 x [CE of the fused logits at x + delta, gradient
w.r.t. delta only, delta += alpha sign(g), clamp to the eps-ball]; model.train(); zero_grad; loss
at x + delta (JT: cross-entropy; CRMT: crmt_loss, rho = 2); backward; SGD(momentum 0.9).step().
So 4 forwards per optimiser step. Candidates (deep copies of one model, the same batch):
* ``JT``: the plain model (nn.Linear fusion head).
* ``CRMT``: CRMTWrapper with the working tree's head (W~ cached per parameter update).
* ``CRMT@REV`` (``--against REV``): the head.py of git revision REV (W~ recomputed at every call).
* ``CRMT retraction`` (``--retraction``): the prototype of benchmarks/_common.retraction_head (V kept
  orthonormal by a QR after each step; W~ = V in the forward) -- not gradient-identical.
Interleaved rounds (all orders in turn), paired ratios; QRs per step counted separately.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

import _common as C
from bench_train_step import av_model, synthetic_model, wrap_at_revision
from crmt_plugin import CRMTWrapper, crmt_loss


def pgd(logits_of, inputs, y, eps: float, alpha: float, steps: int):
    delta = {n: ((torch.rand_like(x) * 2 - 1) * eps).requires_grad_(True) for n, x in inputs.items()}
    for _ in range(steps):
        loss = F.cross_entropy(logits_of({n: inputs[n] + delta[n] for n in inputs}), y)
        grads = torch.autograd.grad(loss, list(delta.values()))
        with torch.no_grad():
            for d, g in zip(delta.values(), grads):
                d.add_(g.sign(), alpha=alpha).clamp_(-eps, eps)
    return {n: inputs[n] + delta[n].detach() for n in inputs}


def adversarial_step(module, logits_of, loss_of, inputs, y, args, after_step=None):
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def run():
        module.eval()
        adv = pgd(logits_of, inputs, y, args.eps, args.eps / 4, args.steps)
        module.train()
        optimizer.zero_grad(set_to_none=True)
        loss_of(adv).backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return run


def candidates(model, modalities, inputs, y, args):
    jt = copy.deepcopy(model)
    crmt = CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=modalities)
    out = {
        "JT": adversarial_step(jt, lambda x: jt(**x), lambda x: F.cross_entropy(jt(**x), y), inputs, y, args),
        "CRMT": adversarial_step(crmt, lambda x: crmt(x).logits, lambda x: crmt_loss(crmt(x), y, rho=2.0),
                                 inputs, y, args),
    }
    if args.against:
        old = wrap_at_revision(copy.deepcopy(model), modalities, args.against)
        out[f"CRMT@{args.against}"] = adversarial_step(old, lambda x: old(x).logits,
                                                       lambda x: crmt_loss(old(x), y, rho=2.0), inputs, y, args)
    if args.retraction:
        ret = CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=modalities)
        retract = C.retraction_head(ret)
        out["CRMT retraction"] = adversarial_step(ret, lambda x: ret(x).logits,
                                                  lambda x: crmt_loss(ret(x), y, rho=2.0), inputs, y, args,
                                                  after_step=retract)
    return out


def qr_per_step(fn) -> int:
    calls = []
    qr = torch.linalg.qr

    def counting(*a, **k):
        calls.append(1)
        return qr(*a, **k)

    torch.linalg.qr = counting
    try:
        fn()
        calls.clear()
        fn()
    finally:
        torch.linalg.qr = qr
    return len(calls)


def main() -> None:
    def extra(p):
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--steps", type=int, default=3, help="PGD steps per training step")
        p.add_argument("--eps", type=float, default=0.1)
        p.add_argument("--cases", default="av,synthetic", help="comma list of av, synthetic, synthetic309")
        p.add_argument("--against", default="", metavar="REV", help="also time the head.py of git revision REV")
        p.add_argument("--retraction", action="store_true", help="also time the retraction prototype")

    args = C.parse_args(__doc__.splitlines()[0], repeats=20, extra=extra)
    print(C.machine())
    print()
    rows, qr_rows = [], []
    for case in args.cases.split(","):
        torch.manual_seed(0)
        if case == "av":
            label, built = "AVDigitsNet (K=10, d=64+64)", av_model()
        elif case == "synthetic":
            label, built = "2x MLP 1024-1024-512 (K=31, d=512+512)", synthetic_model(1024, 1024)
        elif case == "synthetic309":
            label, built = "2x MLP 1024-1024-512 (K=309, d=512+512)", synthetic_model(1024, 1024, num_classes=309)
        else:
            raise SystemExit(f"unknown case {case!r}: av, synthetic, synthetic309")
        model, modalities, make_inputs, num_classes = built
        inputs, y = make_inputs(args.batch), torch.randint(0, num_classes, (args.batch,))
        fns = candidates(model, modalities, inputs, y, args)
        s = C.interleaved(fns, repeats=args.repeats, warmup=args.warmup)
        row = [label, args.batch, args.steps, C.ms(s.median("JT")), C.ms(s.median("CRMT")),
               f"{s.ratio('CRMT', 'JT'):.3f}", f"{s.ratio('CRMT', 'JT', 'wall'):.3f}"]
        header = ["model", "B", "PGD steps", "JT ms", "CRMT ms", "CRMT/JT (CPU)", "CRMT/JT (wall)"]
        if args.against:
            old = f"CRMT@{args.against}"
            row += [C.ms(s.median(old)), f"{s.ratio(old, 'JT'):.3f}", f"{s.ratio('CRMT', old):.3f}"]
            header += [f"{old} ms", f"{old}/JT", f"CRMT/{old}"]
        if args.retraction:
            row += [C.ms(s.median("CRMT retraction")), f"{s.ratio('CRMT retraction', 'JT'):.3f}",
                    f"{s.ratio('CRMT retraction', 'CRMT'):.3f}"]
            header += ["retraction ms", "retraction/JT", "retraction/CRMT"]
        rows.append(row)
        qr_rows.append([label] + [qr_per_step(fns[n]) for n in fns])
    print(C.table(header, rows))
    print()
    print(C.table(["model"] + [f"QRs per step: {n}" for n in fns], qr_rows))
    print(f"\n{args.repeats} interleaved rounds (every order of the candidates in turn) after {args.warmup} "
          "warm-up rounds; times: medians of process CPU time per step; ratios: median over rounds of the "
          "within-round ratio.")


if __name__ == "__main__":
    main()
