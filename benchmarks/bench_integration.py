"""Benchmark 4: step 2 (``fit_integration``, tune a^(m) only) for 45 epochs on cached uni-modal
logits vs 45 epochs that run the encoders forward every epoch (what the reference does).

    python benchmarks/bench_integration.py
    python benchmarks/bench_integration.py --quick          # 3 epochs

Both candidates optimise alpha (a = softplus(alpha)) with Adam (lr 1e-2) on the mean certified radius
of :func:`crmt_plugin.certify.radii_from_unimodal`, batches of 256, the same Lipschitz constants.
``cached`` is ``crmt.fit_integration`` (encoders run once, in eval mode); ``recompute`` runs the
wrapped model forward (eval mode, no grad) on every batch of every epoch, then takes the same step.
The integration weights are reset before every run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

import _common as C
from bench_train_step import TwoMLP
from crmt_plugin import CRMTWrapper, LipschitzConstants
from crmt_plugin.certify import radii_from_unimodal


def recompute_every_epoch(crmt: CRMTWrapper, loader, lipschitz, epochs: int, lr: float = 1e-2) -> torch.Tensor:
    """Step 2 without the cache: the encoders run on every batch of every epoch."""
    head = crmt.head
    names = crmt.modalities
    lip = LipschitzConstants(lipschitz.values.double(), lipschitz.modalities, lipschitz.sound, lipschitz.source)
    bias = head.bias.detach().double()
    gram = crmt.gram_matrices().double()
    alpha = torch.stack([head.integration[n].detach() for n in names]).double().requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=lr)
    was_training = crmt.model.training
    crmt.model.eval()
    try:
        for _ in range(epochs):
            for inputs, y in loader:
                with torch.no_grad():
                    out = crmt(inputs)
                z = torch.stack([out.unimodal[n] for n in names], dim=1).double()
                radius, _, _ = radii_from_unimodal(z, F.softplus(alpha), bias, y, lip,
                                                   denominator="tight", gram=gram)
                opt.zero_grad(set_to_none=True)
                (-radius.mean()).backward()
                opt.step()
    finally:
        crmt.model.train(was_training)
    return alpha.detach()


def build(kind: str, n: int, batch: int):
    torch.manual_seed(0)
    if kind == "av":
        from crmt_plugin.models import AVDigitsNet

        model = AVDigitsNet(feature_dim=64, num_classes=10)
        shapes, modalities, num_classes = {"audio": (13, 32), "image": (1, 28, 28)}, dict(model.feature_dims), 10
        label = "AVDigitsNet (K=10, d=64+64)"
    else:
        model = TwoMLP(1024, 1024, 512, 31)
        shapes, modalities, num_classes = {"audio": (1024,), "visual": (1024,)}, model.widths, 31
        label = "2x MLP 1024-1024-512 (K=31, d=512+512)"
    data = {m: torch.randn(n, *s) for m, s in shapes.items()}
    labels = torch.randint(0, num_classes, (n,))
    loader = [({m: t[i:i + batch] for m, t in data.items()}, labels[i:i + batch]) for i in range(0, n, batch)]
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=modalities)
    # labels = the model's own predictions, so every sample has a positive radius to optimise
    with torch.no_grad():
        crmt.eval()
        loader = [(x, crmt(x).logits.argmax(1)) for x, _ in loader]
        crmt.train()
    return label, crmt, loader


def main() -> None:
    def extra(p):
        p.add_argument("--epochs", type=int, default=45)
        p.add_argument("--samples", type=int, default=1024)
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--models", default="av,synthetic")

    args = C.parse_args(__doc__.splitlines()[0], repeats=3, extra=extra)
    if args.quick:
        args.epochs = 3
    print(C.machine())
    print()
    rows = []
    for kind in args.models.split(","):
        label, crmt, loader = build(kind, args.samples, args.batch)
        lip = LipschitzConstants.declared({n: 1.0 for n in crmt.modalities})
        initial = {n: p.detach().clone() for n, p in crmt.head.integration.items()}

        def reset():
            with torch.no_grad():
                for n, p in crmt.head.integration.items():
                    p.copy_(initial[n])

        def cached():
            reset()
            crmt.fit_integration(loader, lipschitz=lip, epochs=args.epochs, batch_size=args.batch,
                                 generator=torch.Generator().manual_seed(0))

        def recompute():
            reset()
            recompute_every_epoch(crmt, loader, lip, args.epochs)

        s = C.interleaved({"recompute": recompute, "cached": cached}, repeats=args.repeats,
                          warmup=min(args.warmup, 1))
        reset()
        rows.append([
            label, args.samples, args.epochs, f"{s.median('recompute'):.2f}", f"{s.median('cached'):.3f}",
            f"{s.ratio('recompute', 'cached'):.1f}x", f"{s.ratio('recompute', 'cached', 'wall'):.1f}x",
        ])
    print(C.table(
        ["model", "samples", "epochs", "recompute every epoch s", "fit_integration (cached) s",
         "speed-up (CPU)", "speed-up (wall)"],
        rows,
    ))
    print(f"\nBatches of {args.batch}; times: medians of process CPU time over {args.repeats} interleaved "
          "rounds after 1 warm-up round; speed-ups: median over rounds of recompute/cached within the round.")


if __name__ == "__main__":
    main()
