"""Where CRMT's fixed cost goes: a component breakdown (CPU time, interleaved) and torch.profiler
tables. Backs the explanations in docs/benchmarks.md of the targets that are not met.

    python benchmarks/profile_overhead.py             # breakdown + profiler tables
    python benchmarks/profile_overhead.py --quick

1. Training step of the synthetic model (2x MLP 1024-1024-512, K = 31, B = 64), built up piece by
   piece: JT; CRMT head inside the model with plain CE; + CRMTWrapper; + crmt_loss (raw margin);
   + crmt_loss (relative margin, the default).
2. The head alone (features given), K = 31 and 309, d = 512: nn.Linear + CE; the CRMT head (W~ cache
   cleared each call, as after an optimiser step); the CRMT head at fixed parameters (cache hit); the
   CRMT head with W~ precomputed (no QR); the QR map alone (forward + backward; forward only).
3. torch.profiler, top operators by self CPU time: CRMT head forward + backward at K = 31 and 309.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F
from torch import nn

import _common as C
from bench_train_step import synthetic_model
from crmt_plugin import CRMTWrapper, crmt_loss
from crmt_plugin.head import CRMTHead, orthonormalize_rows


def step_breakdown(args) -> None:
    torch.manual_seed(0)
    model, modalities, make_inputs, num_classes = synthetic_model(1024, 1024)
    x, y = make_inputs(64), torch.randint(0, num_classes, (64,))
    jt = copy.deepcopy(model)
    crmt = CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=modalities)

    def step(params, forward):
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            forward().backward()
            opt.step()
        return run

    def head_only():
        loss = F.cross_entropy(crmt.model(**x), y)
        crmt.head.pop_last()
        return loss

    candidates = {
        "JT (nn.Linear + CE)": step(jt.parameters(), lambda: F.cross_entropy(jt(**x), y)),
        "CRMT head in the model, CE": step(crmt.parameters(), head_only),
        "+ CRMTWrapper (checks), CE": step(crmt.parameters(), lambda: F.cross_entropy(crmt(x).logits, y)),
        "+ crmt_loss, raw margin": step(crmt.parameters(), lambda: crmt_loss(crmt(x), y, margin="raw")),
        "+ crmt_loss, relative margin": step(crmt.parameters(), lambda: crmt_loss(crmt(x), y)),
    }
    s = C.interleaved(candidates, repeats=args.repeats, warmup=args.warmup, inner=3)
    base = s.median("JT (nn.Linear + CE)")
    rows = [[k, C.ms(s.median(k)), C.ms(s.median(k) - base), f"{s.ratio(k, 'JT (nn.Linear + CE)'):.3f}"]
            for k in candidates]
    print("Training step, 2x MLP 1024-1024-512, K = 31, d = 512 + 512, B = 64\n")
    print(C.table(["variant", "step ms (CPU)", "over JT ms", "ratio to JT"], rows))


def head_breakdown(args, num_classes: int) -> None:
    torch.manual_seed(0)
    d, batch = 512, 64
    linear = nn.Linear(2 * d, num_classes)
    head = CRMTHead.from_linear(linear, {"a": d, "b": d})
    features = [torch.randn(batch, d, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, num_classes, (batch,))
    fixed = [head.unimodal_weight(n).detach().requires_grad_(True) for n in ("a", "b")]
    directions = [head.directions[n] for n in ("a", "b")]

    def jt():
        F.cross_entropy(linear(torch.cat(features, 1)), y).backward()

    def crmt_head():  # a training step: the parameters changed since the last call, the W~ cache misses
        head.clear_cache()
        F.cross_entropy(head(torch.cat(features, 1)), y).backward()
        head.pop_last()

    def crmt_head_cached():  # an extra pass at fixed parameters (attack / evaluation): the cache hits
        F.cross_entropy(head(torch.cat(features, 1)), y).backward()
        head.pop_last()

    def without_qr():
        parts = torch.cat(features, 1).split(d, 1)
        fused = head.bias
        for a_m, part, w in zip(head.integration_weights().unbind(0), parts, fixed):
            fused = torch.addcmul(fused, a_m, F.linear(part, w))
        F.cross_entropy(fused, y).backward()

    def qr_both():
        sum(orthonormalize_rows(v).sum() for v in directions).backward()

    def qr_forward():
        with torch.no_grad():
            for v in directions:
                orthonormalize_rows(v)

    candidates = {"nn.Linear + CE": jt, "CRMT head + CE": crmt_head, "CRMT head + CE, W~ cached": crmt_head_cached,
                  "CRMT head, W~ given (no QR)": without_qr,
                  "QR map fwd+bwd (2 modalities)": qr_both, "QR map fwd (2 modalities)": qr_forward}
    s = C.interleaved(candidates, repeats=args.repeats if num_classes < 200 else max(3, args.repeats // 4),
                      warmup=args.warmup, inner=10 if num_classes < 200 else 1)
    print(f"\nHead alone, K = {num_classes}, d = 512 + 512, B = 64 (forward + backward unless noted)\n")
    print(C.table(["variant", "ms (CPU)"], [[k, C.ms(s.median(k))] for k in candidates]))


def profiler_table(num_classes: int, rows: int) -> None:
    from torch.profiler import profile

    torch.manual_seed(0)
    head = CRMTHead({"a": 512, "b": 512}, num_classes)
    x, y = torch.randn(64, 1024), torch.randint(0, num_classes, (64,))

    def run():
        head.clear_cache()  # as in a training step: W~ is computed once per call
        F.cross_entropy(head(x), y).backward()
        head.pop_last()
        head.zero_grad(set_to_none=True)

    for _ in range(3):
        run()
    n = 20 if num_classes < 200 else 3
    with C.quiet_stderr(), profile() as prof:
        for _ in range(n):
            run()
    print(f"\ntorch.profiler, CRMT head forward + backward, K = {num_classes}, d = 512 + 512, B = 64, {n} calls "
          "(self CPU time is wall-clock based: inflated on a loaded machine)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], repeats=40)
    print(C.machine())
    print()
    step_breakdown(args)
    head_breakdown(args, 31)
    head_breakdown(args, 309)
    profiler_table(31, 12)
    profiler_table(309, 8)


if __name__ == "__main__":
    main()
