"""Benchmark 3: empirical Lipschitz estimation — CRMTWrapper.estimate_lipschitz (all K classes in one
vectorised backward per batch) vs one backward pass per class, on the same batches.

    python benchmarks/bench_lipschitz.py
    python benchmarks/bench_lipschitz.py --quick

The baseline is the cheapest correct per-class loop: one forward per batch, then K backward passes
(``retain_graph``), cotangent e_k on every modality's z^(m), per-sample gradient norms, max over
the data. Both run in eval mode. The script asserts that both give the same (M, K) values
(float32 models: |diff| <= 1e-6 * max value; float64 copy of each model: <= 1e-12 relative).
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import _common as C
from bench_train_step import TwoMLP
from crmt_plugin import CRMTWrapper


def per_class_loop(crmt: CRMTWrapper, loader) -> torch.Tensor:
    """tau (M, K) with one backward pass per class (the reference's approach, done correctly)."""
    names, num_classes = crmt.modalities, crmt.num_classes
    was_training = crmt.model.training
    crmt.model.eval()
    running = None
    try:
        for inputs, _ in loader:
            leaves = {n: inputs[n].detach().requires_grad_(True) for n in names}
            unimodal = crmt(leaves).unimodal
            outputs = [unimodal[n] for n in names]
            eye = torch.eye(num_classes, dtype=outputs[0].dtype)
            values = torch.zeros(len(names), num_classes, dtype=torch.float64)
            for k in range(num_classes):
                cotangent = eye[k].expand_as(outputs[0])
                grads = torch.autograd.grad(outputs, [leaves[n] for n in names],
                                            grad_outputs=[cotangent] * len(names),
                                            retain_graph=k + 1 < num_classes)
                for m, g in enumerate(grads):
                    values[m, k] = torch.linalg.vector_norm(g.flatten(1).double(), dim=1).amax()
            running = values if running is None else torch.maximum(running, values)
    finally:
        crmt.model.train(was_training)
    return running


def build(kind: str, num_classes: int, batch: int, batches: int):
    torch.manual_seed(0)
    if kind == "av":
        from crmt_plugin.models import AVDigitsNet

        model = AVDigitsNet(feature_dim=64, num_classes=num_classes)
        shapes = {"audio": (13, 32), "image": (1, 28, 28)}
        label = f"AVDigitsNet (K={num_classes}, d=64+64)"
    elif kind == "tiny":
        model = TwoMLP(32, 64, 32, num_classes)
        shapes = {"audio": (32,), "visual": (32,)}
        label = f"tiny 2x MLP 32-64-32 (K={num_classes}, d=32+32)"
    else:
        model = TwoMLP(1024, 1024, 512, num_classes)
        shapes = {"audio": (1024,), "visual": (1024,)}
        label = f"2x MLP 1024-1024-512 (K={num_classes}, d=512+512)"
    model.train()  # BatchNorm running statistics: a few training-mode batches
    with torch.no_grad():
        for _ in range(3):
            model(**{n: torch.randn(batch, *s) for n, s in shapes.items()})
    loader = [({n: torch.randn(batch, *s) for n, s in shapes.items()}, torch.zeros(batch, dtype=torch.long))
              for _ in range(batches)]
    modalities = dict(model.feature_dims) if hasattr(model, "feature_dims") else model.widths
    return label, model, modalities, loader


def main() -> None:
    def extra(p):
        p.add_argument("--classes", type=int, default=31)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--batches", type=int, default=4)
        p.add_argument("--models", default="synthetic,av,tiny", help="comma list of synthetic, av, tiny")

    args = C.parse_args(__doc__.splitlines()[0], repeats=10, extra=extra)
    print(C.machine())
    print()
    rows = []
    for kind in args.models.split(","):
        label, model, modalities, loader = build(kind, args.classes, args.batch, args.batches)
        crmt = CRMTWrapper(model, head="fusion.fc", modalities=modalities)
        vectorised = crmt.estimate_lipschitz(loader).values
        looped = per_class_loop(crmt, loader)
        diff = float((vectorised - looped).abs().max())
        scale = float(looped.abs().max())
        assert diff <= 1e-6 * scale, f"{label}: vectorised and per-class values differ by {diff} (max {scale})"
        # the same comparison on a float64 copy: equal to rounding
        crmt64 = copy.deepcopy(crmt).double()
        loader64 = [({n: t.double() for n, t in x.items()}, y) for x, y in loader]
        v64, l64 = crmt64.estimate_lipschitz(loader64).values, per_class_loop(crmt64, loader64)
        diff64 = float((v64 - l64).abs().max())
        assert diff64 <= 1e-12 * float(l64.abs().max()), f"{label}: float64 values differ by {diff64}"
        s = C.interleaved(
            {"loop": lambda: per_class_loop(crmt, loader), "vectorised": lambda: crmt.estimate_lipschitz(loader)},
            repeats=args.repeats, warmup=args.warmup,
        )
        n = args.batch * args.batches
        rows.append([
            label, n, C.ms(s.median("loop")), C.ms(s.median("vectorised")),
            f"{s.ratio('loop', 'vectorised'):.1f}x", f"{s.ratio('loop', 'vectorised', 'wall'):.1f}x",
            f"{diff / scale:.1e}", f"{diff64 / float(l64.abs().max()):.1e}",
        ])
    print(C.table(
        ["model", "samples", "per-class loop ms", "estimate_lipschitz ms", "speed-up (CPU)", "speed-up (wall)",
         "max rel. diff fp32", "max rel. diff fp64"],
        rows,
    ))
    print(f"\n{args.batches} batches of {args.batch}; times: medians of process CPU time over {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up rounds; speed-ups: median over rounds of "
          "loop/vectorised within the round. Values asserted equal (see the last two columns).")


if __name__ == "__main__":
    main()
