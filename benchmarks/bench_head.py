"""Benchmark 2: the CRMT head (batched QR orthonormalisation) vs the reference implementation's
per-class-row SVD normalisation loop, forward + backward, two modalities of width d.

    python benchmarks/bench_head.py                 # K = 31, 101, 309; d = 512; B = 64
    python benchmarks/bench_head.py --quick

The baseline re-implements the reference's fusion layer: per modality, the (K, d) weight block goes
through "orthogonal weight normalisation" with one group per class, i.e. in a Python loop over the
K rows: centre the row, form its 1x1 covariance, take its SVD, scale by eigenvalue^(-1/2) (the row is
only centred and normalised; rows are not orthogonal — spec §6.1); then z^(m) = x^(m) W^T and the
fused logits sum_m a^(m) * z^(m) + b. It runs on every forward, as in the reference.
Both heads are timed on the same input and the same loss: cross-entropy on the fused logits plus the
mean of the uni-modal logits (so every output is back-propagated).
"CRMT" clears the head's W~ cache before every call (the parameters change at every training step,
so the cache misses there); "CRMT cached" keeps it (the extra passes of an attack or of evaluation
at fixed parameters: no QR in the forward, the QR's backward formula on the cached factors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F
from torch import nn

import _common as C
from crmt_plugin.head import CRMTHead


def per_row_svd_normalise(weight: torch.Tensor) -> torch.Tensor:
    """The reference's normalisation with one group per class row (a Python loop, one SVD per row)."""
    groups = weight.view(weight.shape[0], 1, -1)  # (K, 1, d): one group per class
    centred = groups - groups.mean(dim=-1, keepdim=True)
    cov = centred @ centred.transpose(1, 2)  # (K, 1, 1)
    whitening = torch.randn(cov.shape).to(cov)  # overwritten row by row, as in the reference
    for i in range(weight.shape[0]):
        u, eig, _ = torch.linalg.svd(cov[i])
        whitening[i] = u @ torch.diag(eig.rsqrt()) @ u.t()
    return (whitening @ centred).view_as(weight)


class ReferenceHead(nn.Module):
    """The reference's fusion head: one nn.Linear whose column blocks are normalised per modality."""

    def __init__(self, widths, num_classes: int) -> None:
        super().__init__()
        self.widths = list(widths)
        self.fc = nn.Linear(sum(self.widths), num_classes)
        self.a = nn.ParameterList([nn.Parameter(torch.full((num_classes,), 0.1)) for _ in self.widths])

    def forward(self, x: torch.Tensor):
        start, outs, fused = 0, [], None
        for m, width in enumerate(self.widths):
            weight = per_row_svd_normalise(self.fc.weight[:, start:start + width])
            z = x[:, start:start + width] @ weight.t()
            start += width
            outs.append(z)
            term = z * self.a[m].view(1, -1).expand(z.shape)
            fused = term if fused is None else fused + term
        return outs, fused + self.fc.bias


def main() -> None:
    def extra(p):
        p.add_argument("--classes", default="31,101,309")
        p.add_argument("--dim", type=int, default=512)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--against", default="", metavar="REV",
                       help="also time the CRMTHead of git revision REV (before/after)")

    args = C.parse_args(__doc__.splitlines()[0], repeats=15, extra=extra)
    print(C.machine())
    print()
    rows, against_rows, cached_rows = [], [], []
    old_head = C.load_revision(args.against, "head") if args.against else None
    for num_classes in [int(k) for k in args.classes.split(",")]:
        torch.manual_seed(0)
        d, batch = args.dim, args.batch
        widths = {"audio": d, "visual": d}
        reference = ReferenceHead(widths.values(), num_classes)
        crmt = CRMTHead(widths, num_classes)
        x = torch.randn(batch, 2 * d)
        y = torch.randint(0, num_classes, (batch,))

        def run_reference():
            outs, fused = reference(x)
            loss = F.cross_entropy(fused, y) + sum(z.mean() for z in outs)
            loss.backward()
            reference.zero_grad(set_to_none=True)

        def crmt_step(head, fresh=True):
            """fresh: the parameters changed since the last call (a training step: the cache misses,
            as after every optimiser step); otherwise an extra pass at fixed parameters (a hit)."""
            def run():
                if fresh and hasattr(head, "clear_cache"):
                    head.clear_cache()
                fused = head(x)
                outs = head.pop_last()["unimodal"].values()
                loss = F.cross_entropy(fused, y) + sum(z.mean() for z in outs)
                loss.backward()
                head.zero_grad(set_to_none=True)
            return run

        run_crmt = crmt_step(crmt)

        def forward_only(fn):
            def run():
                with torch.no_grad():
                    fn(x)
                    if isinstance(fn, CRMTHead):
                        fn.pop_last()
            return run

        repeats = max(3, args.repeats if num_classes < 200 else args.repeats // 2)
        s = C.interleaved({"reference": run_reference, "crmt": run_crmt, "crmt cached": crmt_step(crmt, fresh=False)},
                          repeats=repeats, warmup=args.warmup)
        if old_head is not None:  # a separate pair: the reference's allocations would handicap one of them
            previous = old_head.CRMTHead(widths, num_classes)
            previous.load_state_dict(crmt.state_dict())
            b = C.interleaved({"before": crmt_step(previous), "crmt": run_crmt}, repeats=repeats,
                              warmup=args.warmup,
                              inner=10 if num_classes < 200 else 1)
            against_rows.append([num_classes, d, batch, C.ms(b.median("before")), C.ms(b.median("crmt")),
                                 f"{b.ratio('crmt', 'before'):.3f}"])
        def forward_fresh():
            crmt.clear_cache()
            forward_only(crmt)()

        f = C.interleaved({"reference": forward_only(reference), "crmt": forward_fresh,
                           "crmt cached": forward_only(crmt)}, repeats=repeats, warmup=args.warmup)
        rows.append([
            num_classes, d, batch,
            C.ms(s.median("reference")), C.ms(s.median("crmt")),
            f"{s.ratio('reference', 'crmt'):.1f}x", f"{s.ratio('reference', 'crmt', 'wall'):.1f}x",
            C.ms(f.median("reference")), C.ms(f.median("crmt")), f"{f.ratio('reference', 'crmt'):.1f}x",
        ])
        cached_rows.append([
            num_classes, d, batch, C.ms(s.median("crmt cached")), f"{s.ratio('reference', 'crmt cached'):.1f}x",
            C.ms(f.median("crmt cached")), f"{f.ratio('reference', 'crmt cached'):.1f}x",
        ])
    print(C.table(
        ["K", "d", "B", "reference fwd+bwd ms", "CRMT fwd+bwd ms", "speed-up (CPU)", "speed-up (wall)",
         "reference fwd ms", "CRMT fwd ms", "fwd speed-up (CPU)"],
        rows,
    ))
    print("\nAt fixed parameters (extra passes of an attack / evaluation: the W~ cache hits)\n")
    print(C.table(["K", "d", "B", "CRMT cached fwd+bwd ms", "speed-up (CPU)", "CRMT cached fwd ms",
                   "fwd speed-up (CPU)"], cached_rows))
    if against_rows:
        print(f"\nBefore/after: CRMTHead of {args.against} vs the working tree, fwd+bwd (same run, interleaved)\n")
        print(C.table(["K", "d", "B", f"CRMTHead@{args.against} ms", "CRMTHead now ms", "now/before"],
                      against_rows))
    print(f"\nTwo modalities of width d each; times: medians of process CPU time over {args.repeats} "
          f"interleaved rounds (half for K >= 200) after {args.warmup} warm-up rounds; speed-ups: median "
          "over rounds of reference/CRMT within the round.")


if __name__ == "__main__":
    main()
