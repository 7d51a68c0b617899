"""Benchmark 5: certification throughput (samples/s) and peak memory.

    python benchmarks/bench_certify.py
    python benchmarks/bench_certify.py --quick

For each model and batch size: ``crmt.certify(inputs, y, lipschitz=...)`` with declared per-modality
constants (the "tight" denominator) and with empirical per-class constants ("paper"), against plain
inference of the same model (``crmt.export()``, eval mode, no grad) — the floor, since a certificate
needs one forward pass. Also the radius computation alone (``radii_from_unimodal`` on cached
uni-modal logits, float64). Memory: peak torch CPU allocations during the call (profiler events).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import _common as C
from bench_train_step import TwoMLP
from crmt_plugin import CRMTWrapper, LipschitzConstants
from crmt_plugin.certify import radii_from_unimodal


def build(kind: str):
    torch.manual_seed(0)
    if kind == "av":
        from crmt_plugin.models import AVDigitsNet

        model = AVDigitsNet(feature_dim=64, num_classes=10)
        return "AVDigitsNet (K=10)", model, dict(model.feature_dims), {"audio": (13, 32), "image": (1, 28, 28)}, 10
    model = TwoMLP(1024, 1024, 512, 31)
    return "2x MLP 1024-1024-512 (K=31)", model, model.widths, {"audio": (1024,), "visual": (1024,)}, 31


def main() -> None:
    def extra(p):
        p.add_argument("--batches", default="64,256,1024")
        p.add_argument("--models", default="av,synthetic")

    args = C.parse_args(__doc__.splitlines()[0], repeats=10, extra=extra)
    print(C.machine())
    print()
    rows, mem_rows = [], []
    for kind in args.models.split(","):
        label, model, modalities, shapes, num_classes = build(kind)
        crmt = CRMTWrapper(model, head="fusion.fc", modalities=modalities).eval()
        plain = crmt.export().eval()
        declared = LipschitzConstants.declared({n: 1.0 for n in modalities})
        empirical = LipschitzConstants(torch.rand(len(modalities), num_classes, dtype=torch.float64) + 0.5,
                                       tuple(modalities), sound=False, source="empirical")
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = {n: torch.randn(batch, *s) for n, s in shapes.items()}
            with torch.no_grad():
                y = plain(**inputs).argmax(1)  # correctly classified: every radius is computed in full
                out = crmt(inputs)
            z = torch.stack([out.unimodal[n] for n in crmt.modalities], dim=1).double()
            a = crmt.head.integration_weights().detach().double()
            bias = crmt.head.bias.detach().double()
            gram = crmt.gram_matrices().double()

            def inference():
                with torch.no_grad():
                    plain(**inputs)

            candidates = {
                "inference": inference,
                "certify tight": lambda: crmt.certify(inputs, y, lipschitz=declared),
                "certify paper": lambda: crmt.certify(inputs, y, lipschitz=empirical),
                "radii only": lambda: radii_from_unimodal(z, a, bias, y, declared, denominator="tight", gram=gram),
            }
            s = C.interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
            peak = {n: C.peak_allocated_bytes(fn) for n, fn in candidates.items()}
            rows.append([
                label, batch,
                f"{batch / s.median('inference'):.0f}",
                f"{batch / s.median('certify tight'):.0f}",
                f"{batch / s.median('certify paper'):.0f}",
                f"{s.ratio('certify tight', 'inference'):.2f}",
                f"{batch / s.median('radii only'):.3g}",
            ])
            mem_rows.append([
                label, batch, C.mib(peak["inference"]), C.mib(peak["certify tight"]),
                C.mib(peak["certify paper"]), C.mib(peak["radii only"]),
            ])
    print(C.table(
        ["model", "B", "inference samples/s", "certify (tight) samples/s", "certify (paper) samples/s",
         "certify/inference time", "radii only samples/s"],
        rows,
    ))
    print()
    print(C.table(
        ["model", "B", "inference peak MiB", "certify (tight) peak MiB", "certify (paper) peak MiB",
         "radii only peak MiB"],
        mem_rows,
    ))
    print(f"\nThroughput from medians of process CPU time over {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up rounds; certify/inference: median over rounds of the ratio within the round. "
          "Peak: torch CPU allocations during one call, above what was live before it.")


if __name__ == "__main__":
    main()
