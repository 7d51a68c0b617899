"""Robustness evaluation on real data: audio-visual digits (spoken digit + handwritten digit).

    python examples/evaluate_robustness.py --figures docs/figures    # about 4 minutes on one CPU core

Trains two late-fusion models for a few epochs (model selection on the validation split):

* JT   - joint training, cross-entropy only (the baseline that shows modality preference);
* CRMT - the same network with the CRMT head and margin loss, then step 2 (integration weights);

then, on the test split, runs :func:`crmt_plugin.evaluation.evaluate_robustness` (clean, FGM /
PGD-l2 on each modality alone and on both jointly over a list of radii, each modality missing
(zeros / training mean), certified accuracy for CRMT) and
:func:`crmt_plugin.evaluation.modality_report`. Prints markdown tables, writes
``results.md`` into ``--out`` and ``robustness_av_<method>.png`` into ``--figures``.

Radii are l2 norms in normalised input units (audio: MFCCs standardised per coefficient, 13 x 32
values; image: pixels standardised with one scalar mean / std, 28 x 28 values, valid range about
[-0.43, 2.81], which the attacks respect).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))

import crmt_plugin  # noqa: E402
from crmt_plugin.attacks import FGM, PGD  # noqa: E402
from crmt_plugin.datasets import load_av_digits  # noqa: E402
from crmt_plugin.evaluation import evaluate_robustness, modality_report  # noqa: E402
from crmt_plugin.models import AVDigitsNet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="training epochs per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", choices=["jt", "crmt"], default=["jt", "crmt"])
    p.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 3.0, 4.0])
    p.add_argument("--certified-radii", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    p.add_argument("--report-radius", type=float, default=2.0, help="radius of the modality report's attacks")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts")
    p.add_argument("--rho", type=float, default=2.0, help="CRMT margin-term weight")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("runs", "evaluate_robustness"), help="results.md goes here")
    p.add_argument("--figures", default=None, help="where the PNG plots go (default: --out)")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    return p.parse_args(argv)


def accuracy(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, y in loader:
            out = model(inputs)
            correct += int((getattr(out, "logits", out).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def train(model, forward_loss, splits, args, trainable):
    """Adam, a few epochs, keep the weights of the best validation epoch."""
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(splits.val, batch_size=256)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-3, weight_decay=1e-4)
    best, best_state = -1.0, None
    for _ in range(args.epochs):
        trainable.train()
        for inputs, y in loader:
            loss = forward_loss(inputs, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        acc = accuracy(trainable, val)
        if acc > best:
            best, best_state = acc, copy.deepcopy(trainable.state_dict())
    trainable.load_state_dict(best_state)
    trainable.eval()
    return best


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = args.figures or args.out
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(figures, exist_ok=True)
    splits = load_av_digits(seed=0)
    test = splits.test if args.limit is None else torch.utils.data.Subset(splits.test, range(args.limit))
    test_loader = torch.utils.data.DataLoader(test, batch_size=200)
    train_loader = torch.utils.data.DataLoader(splits.train, batch_size=256)
    bounds = splits.bounds  # image: the standardised [0, 1] pixel range; audio: unbounded
    attacks = {
        "FGM-l2": FGM(1.0, bounds=bounds),
        "PGD-l2": PGD(1.0, steps=args.steps, restarts=args.restarts, bounds=bounds),
    }
    fill = splits.train_mean
    md = [f"Command: `python examples/{os.path.basename(__file__)} {' '.join(sys.argv[1:] if argv is None else argv)}`",
          f"AV digits test split: {len(test)} pairs; PGD-l2 {args.steps} steps, {args.restarts} restart(s), "
          "random start; radii in normalised input units.", ""]  # fmt: skip

    for method in args.methods:
        torch.manual_seed(args.seed)
        model = AVDigitsNet(feature_dim=64, num_classes=splits.num_classes)
        started = time.time()
        lipschitz = None
        if method == "jt":
            ce = torch.nn.CrossEntropyLoss()
            val = train(model, lambda x, y: ce(model(x), y), splits, args, model)
            evaluated = model
        else:
            crmt = crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)
            val = train(crmt, lambda x, y: crmt_plugin.crmt_loss(crmt(x), y, rho=args.rho), splits, args, crmt)
            lipschitz = crmt.estimate_lipschitz(train_loader)
            crmt.fit_integration(train_loader, lipschitz=lipschitz, epochs=max(1, args.epochs // 3))
            evaluated = crmt
        trained = time.time()
        result = evaluate_robustness(
            evaluated, test_loader, attacks, radii=args.radii, lipschitz=lipschitz,
            certified_radii=args.certified_radii, fill=fill, seed=args.seed, progress=args.progress,
        )  # fmt: skip
        report = modality_report(
            evaluated, test_loader, radius=args.report_radius, attack=attacks["PGD-l2"], lipschitz=lipschitz,
            fill=fill, seed=args.seed, progress=args.progress,
        )  # fmt: skip
        done = time.time()
        name = method.upper()
        png = result.plot(os.path.join(figures, f"robustness_av_{method}.png"), dpi=90,
                          title=f"{name} on AV digits (test, n={len(test)})")  # fmt: skip
        section = [
            f"## {name}",
            "",
            f"Validation accuracy {val:.3f}; training {trained - started:.0f} s, evaluation {done - trained:.0f} s.",
            "",
            result.table("markdown", pivot=True),
            "",
            report.table("markdown"),
            "",
            report.summary().replace("\n", "  \n"),
            "",
            f"![{name}]({os.path.relpath(png, args.out)})",
            "",
        ]
        md += section
        print("\n".join(section), flush=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {args.out}/results.md and {figures}/robustness_av_*.png")


if __name__ == "__main__":
    main()
