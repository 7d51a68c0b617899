"""Shared plumbing of the example scripts: arguments, data, validation, evaluation, saving.

Not part of the library. Every training script in this folder is an ordinary PyTorch loop; what
they share (and what is the same for a baseline and its CRMT version) lives here:

* :func:`parse_args` - the common flags (``--dataset --epochs --seed --device --out --limit`` ...);
* :func:`setup` -> :class:`Run` - seeds, the real offline data (AV digits or mfeat), loaders, the
  reference model, the training attack, a tqdm progress bar, model selection on the validation split;
* :meth:`Run.finish` - the robustness evaluation on the test split
  (:func:`crmt_plugin.evaluation.evaluate_robustness`), a checkpoint and ``metrics.json``.

Run any script from the repository root, e.g. ``python examples/crmt_jt.py --epochs 8``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

import crmt_plugin  # noqa: E402
from crmt_plugin.attacks import FGM, PGD  # noqa: E402
from crmt_plugin.datasets import load_av_digits, load_mfeat  # noqa: E402
from crmt_plugin.evaluation import evaluate_robustness  # noqa: E402
from crmt_plugin.models import AVDigitsNet, MultiViewMLP  # noqa: E402

# Per-dataset defaults: epochs of step 1, and the l2 radii (normalised input units) of the evaluation.
DATASETS = {
    "av": dict(epochs=8, radii=(1.0, 2.0), cert_radii=(0.5, 1.0), train_eps=1.0),
    "mfeat": dict(epochs=20, radii=(1.0, 2.0), cert_radii=(0.5, 1.0), train_eps=1.0),
}


# --------------------------------------------------------------------------------------------------
# arguments


def parse_args(description: str, argv: Optional[Sequence[str]] = None, crmt: bool = False) -> argparse.Namespace:
    """The flags every example takes; ``crmt=True`` adds the CRMT ones (``--rho --temperature ...``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="av",
                   help="av: audio-visual digits (2 modalities, default); mfeat: UCI digits, 6 views")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: av 8, mfeat 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model initialisation, shuffling and attacks")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data split (fixed across --seed)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", default=None, help="output folder (default: runs/<script>-<dataset>-seed<seed>)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--train-eps", type=float, default=None,
                   help="l2 budget of the training attack (PGD-AT / TRADES), joint over modalities (default 1.0)")
    p.add_argument("--train-steps", type=int, default=3, help="PGD steps of the training attack")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES weight of the KL term")
    p.add_argument("--alpha", type=float, default=1.0, help="Mixup: lambda ~ Beta(alpha, alpha)")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the evaluation attacks")
    p.add_argument("--eval-restarts", type=int, default=1, help="PGD restarts of the evaluation attacks")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="l2 radii of the evaluation attacks (default 1 2)")
    p.add_argument("--cert-radii", type=float, nargs="+", default=None,
                   help="l2 radii of the certified accuracy (default 0.5 1)")
    p.add_argument("--fgm-radius", type=float, default=1.0, help="l2 radius of the (joint) FGM evaluation")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N samples of each split (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.add_argument("--no-table", action="store_true", help="do not print the result table")
    if crmt:
        p.add_argument("--rho", type=float, default=2.0, help="CRMT: weight of the uni-modal margin term")
        p.add_argument("--temperature", type=float, default=10.0, help="CRMT: temperature of the relative margin")
        p.add_argument("--integration-epochs", type=int, default=None,
                       help="CRMT step 2: epochs on the cached logits (default: a third of --epochs, at least 1)")
        p.add_argument("--integration-lr", type=float, default=1e-2, help="CRMT step 2: Adam learning rate on a")
    args = p.parse_args(argv)
    defaults = DATASETS[args.dataset]
    if args.epochs is None:
        args.epochs = defaults["epochs"]
    if args.radii is None:
        args.radii = list(defaults["radii"])
    if args.cert_radii is None:
        args.cert_radii = list(defaults["cert_radii"])
    if args.train_eps is None:
        args.train_eps = defaults["train_eps"]
    if crmt and args.integration_epochs is None:
        args.integration_epochs = max(1, args.epochs // 3)
    return args


# --------------------------------------------------------------------------------------------------
# the run: data, model, loaders, training helpers


def _limited(dataset, limit: Optional[int]):
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


class Run:
    """Everything a training script needs besides its own loop.

    Attributes:
        args: the parsed flags.
        splits: the :class:`~crmt_plugin.datasets.MultiModalSplits` (train / val / test).
        model: a fresh reference late-fusion model (its fusion layer is ``model.fusion.fc``).
        train_loader / val_loader / test_loader: loaders of ``({name: (B, ...)}, y)``.
        bounds: valid input range of each modality (normalised units), for the attacks.
        fill: the training mean of each modality, the missing-modality filler.
    """

    def __init__(self, args: argparse.Namespace, method: str) -> None:
        self.args = args
        self.method = method
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        if args.dataset == "av":
            self.splits = load_av_digits(seed=args.data_seed)
            self.model: nn.Module = AVDigitsNet(feature_dim=64, num_classes=self.splits.num_classes)
        else:
            self.splits = load_mfeat(seed=args.data_seed)
            dims = {name: shape[0] for name, shape in self.splits.feature_shapes.items()}
            self.model = MultiViewMLP(dims, feature_dim=32, num_classes=self.splits.num_classes)
        self.model.to(self.device)
        self.bounds = self.splits.bounds
        self.fill = {n: t.to(self.device) for n, t in self.splits.train_mean.items()}
        generator = torch.Generator().manual_seed(args.seed)
        loader = lambda split, **kw: torch.utils.data.DataLoader(  # noqa: E731
            _limited(getattr(self.splits, split), args.limit), batch_size=args.batch_size, **kw)
        self.train_loader = loader("train", shuffle=True, generator=generator, drop_last=False)
        self.val_loader = loader("val")
        self.test_loader = loader("test")
        self.attack_generator = torch.Generator().manual_seed(args.seed + 1)
        self.out = args.out or os.path.join("runs", f"{method}-{args.dataset}-seed{args.seed}")
        self.best_state: Optional[Dict[str, Tensor]] = None
        self.best_val = -1.0
        self.best_epoch = 0
        self.history: List[Dict[str, float]] = []
        self._bar = None
        self._started = time.time()
        self._trained = None

    # -- training -----------------------------------------------------------------------------------

    def train_attack(self, **changes: Any) -> PGD:
        """The training attack of PGD-AT / TRADES: l2 PGD, one joint budget over all modalities."""
        return PGD(self.args.train_eps, norm="l2", steps=self.args.train_steps, bounds=self.bounds,
                   generator=self.attack_generator, **changes)

    def epochs(self) -> Iterator[int]:
        """1 .. epochs, with a tqdm progress bar (loss and validation accuracy in its postfix)."""
        epochs = range(1, self.args.epochs + 1)
        if not self.args.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(epochs, desc=f"{self.method} ({self.args.dataset})", unit="epoch")
            epochs = self._bar
        for epoch in epochs:
            self._loss_sum, self._loss_n = 0.0, 0
            yield epoch
        if self._bar is not None:
            self._bar.close()
        self._trained = time.time()

    def batches(self) -> Iterator[Tuple[Dict[str, Tensor], Tensor]]:
        """The training batches, on the device."""
        for inputs, y in self.train_loader:
            yield {n: t.to(self.device) for n, t in inputs.items()}, y.to(self.device)

    def log(self, loss: Tensor) -> None:
        """Record a training loss (shown in the progress bar)."""
        self._loss_sum += float(loss.detach())
        self._loss_n += 1

    @torch.no_grad()
    def accuracy(self, model: nn.Module, loader) -> float:
        was = model.training
        model.eval()
        correct = total = 0
        for inputs, y in loader:
            logits = model({n: t.to(self.device) for n, t in inputs.items()})
            logits = getattr(logits, "logits", logits)
            correct += int((logits.argmax(1) == y.to(self.device)).sum())
            total += int(y.shape[0])
        model.train(was)
        return correct / max(total, 1)

    def validate(self, model: nn.Module) -> float:
        """Validation accuracy; keeps a copy of the best model so far (model selection on val only)."""
        acc = self.accuracy(model, self.val_loader)
        loss = self._loss_sum / max(self._loss_n, 1)
        self.history.append({"epoch": len(self.history) + 1, "train_loss": loss, "val_accuracy": acc})
        if acc > self.best_val:
            self.best_val, self.best_epoch = acc, len(self.history)
            self.best_state = copy.deepcopy(model.state_dict())
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.3f}", best=f"{self.best_val:.3f}")
        return acc

    def restore_best(self, model: nn.Module) -> None:
        """Load the weights of the epoch with the best validation accuracy."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, model, lipschitz=None):
        """On the test split: clean; l2-PGD on each modality alone and on all jointly, at each radius;
        l2-FGM on all modalities at --fgm-radius; each modality missing (training-mean fill);
        certified accuracy (joint and per modality) at each certificate radius."""
        args, joint = self.args, tuple(self.splits.modalities)
        if lipschitz is None:  # a plain joint-training model: certify through its own linear head
            model = certifiable_copy(model)
            lipschitz = model.estimate_lipschitz(self.train_loader)
        shared = dict(fill=self.fill, seed=args.seed, device=self.device)
        pgd = PGD(1.0, norm="l2", steps=args.eval_steps, restarts=args.eval_restarts, bounds=self.bounds)
        result = evaluate_robustness(model, self.test_loader, {"PGD-l2": pgd}, radii=args.radii, **shared)
        fgm = FGM(args.fgm_radius, norm="l2", modalities=joint, bounds=self.bounds)
        extra = evaluate_robustness(model, self.test_loader, {"FGM-l2": fgm}, missing=False, **shared)
        certified = evaluate_robustness(model, self.test_loader, None, radii=args.cert_radii,
                                        lipschitz=lipschitz, missing=False, **shared)
        result.rows += [r for r in extra.rows + certified.rows if r["attack"] != "clean"]
        return result

    def finish(self, model: nn.Module, crmt=None, lipschitz=None, **extra: Any) -> Dict[str, Any]:
        """Evaluate on the test split, save ``model.pt`` and ``metrics.json`` in ``--out``, print the table.

        ``model`` is the user's model (for CRMT: with the CRMT head inside); ``crmt`` and
        ``lipschitz`` add the CRMT certificate. Returns the metrics.
        """
        trained = self._trained or time.time()
        model.eval()
        result = self.evaluate(crmt if crmt is not None else model, lipschitz=lipschitz)
        metrics = {
            "method": self.method,
            "dataset": self.args.dataset,
            "seed": self.args.seed,
            "data_seed": self.args.data_seed,
            "epochs": self.args.epochs,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.best_val,
            "train_seconds": trained - self._started,
            "eval_seconds": time.time() - trained,
            "args": {k: v for k, v in vars(self.args).items()},
            "history": self.history,
            "lipschitz": lipschitz.to_dict() if lipschitz is not None else None,
            "integration_weights": ({n: a.tolist() for n, a in crmt.integration_weights().items()}
                                    if crmt is not None else None),
            "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                     for r in result.rows],
            "summary": summarize(result.rows, self.splits.modalities),
            **extra,
        }
        os.makedirs(self.out, exist_ok=True)
        plain = crmt.export() if crmt is not None else model  # a plain nn.Linear head, same logits
        torch.save(plain.state_dict(), os.path.join(self.out, "model.pt"))
        if crmt is not None:
            torch.save(crmt.state_dict(), os.path.join(self.out, "crmt.pt"))
        with open(os.path.join(self.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=_json_default)
        if not (self.args.quiet or self.args.no_table):
            print(f"\n{self.method} on {self.args.dataset}, seed {self.args.seed}: best validation accuracy "
                  f"{self.best_val:.3f} (epoch {self.best_epoch}); test split:")
            print(format_summary({self.method: metrics["summary"]}))
            print(f"saved {self.out}/model.pt and metrics.json")
        metrics["result"] = result
        return metrics


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def setup(args: argparse.Namespace, method: str) -> Run:
    return Run(args, method)


# --------------------------------------------------------------------------------------------------
# certificates for a plain joint-training model


def certifiable_copy(model: nn.Module) -> crmt_plugin.CRMTWrapper:
    """A plain joint-training model, certifiable exactly as CRMT certifies its own head.

    ``orthonormal=False`` rewrites the linear head, without changing its logits, as unit-norm rows
    with their norms as a: h = sum_m a^(m) * z^(m) + b. Works on a deep copy; the model is untouched.
    """
    return crmt_plugin.CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=model.feature_dims,
                                   orthonormal=False)


# --------------------------------------------------------------------------------------------------
# summaries


def _acc(rows, attack: str, modalities: str, radius: Optional[float]) -> Optional[float]:
    for r in rows:
        if r["attack"] == attack and r["modalities"] == modalities:
            if radius is None or (r["radius"] is not None and math.isclose(r["radius"], radius)):
                return float(r["accuracy"])
    return None


TABLE_RADII = (1.0, 2.0)  # attack radii of the summary tables (when evaluated)
TABLE_CERT_RADII = (0.5, 1.0)  # certificate radii of the summary tables (when evaluated)


def summarize(rows, modalities: Sequence[str], radii: Sequence[float] = TABLE_RADII,
              cert_radii: Sequence[float] = TABLE_CERT_RADII) -> Dict[str, float]:
    """The headline numbers as {column: accuracy}: clean, FGM (joint), PGD (joint), PGD on each
    modality, each modality missing (training-mean fill), certified (joint), at the given radii."""
    joint = "+".join(modalities)
    out: Dict[str, Optional[float]] = {"clean": _acc(rows, "clean", joint, None)}
    fgm = [r for r in rows if r["attack"] == "FGM-l2"]
    if fgm:
        out[f"FGM {fgm[0]['radius']:g}"] = float(fgm[0]["accuracy"])
    for r in radii:
        out[f"PGD {r:g}"] = _acc(rows, "PGD-l2", joint, r)
    for m in modalities:
        for r in radii:
            out[f"PGD {m} {r:g}"] = _acc(rows, "PGD-l2", m, r)
    for m in modalities:
        out[f"missing {m}"] = _acc(rows, "missing (fill)", m, None)
    for r in cert_radii:
        out[f"cert {r:g}"] = _acc(rows, "certified", joint, r)
    return {k: v for k, v in out.items() if v is not None}


def format_summary(summaries: Mapping[str, Mapping[str, float]], fmt: str = "text") -> str:
    """Methods as rows, columns as in :func:`summarize`, accuracies in %."""
    columns: List[str] = []
    for s in summaries.values():
        columns += [c for c in s if c not in columns]
    header = ["method"] + columns
    body = [[name] + [f"{100 * s[c]:.1f}" if c in s else "-" for c in columns] for name, s in summaries.items()]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    return "\n".join(lines)


def describe_column(column: str) -> str:
    """A human description of a summary column, e.g. ``"PGD audio 2"`` -> ``"l2-PGD, r=2, audio only"``."""
    parts = column.split()
    if parts[0] == "clean":
        return "clean"
    if parts[0] == "FGM":
        return f"l2-FGM, r={parts[1]}, all modalities"
    if parts[0] == "PGD":
        return f"l2-PGD, r={parts[-1]}, " + ("all modalities" if len(parts) == 2 else f"{parts[1]} only")
    if parts[0] == "missing":
        return f"{parts[1]} missing (train-mean fill)"
    if parts[0] == "cert":
        return f"certified, r={parts[1]} (empirical)"
    return column


def format_columns(summaries: Mapping[str, Mapping[str, float]], describe=describe_column) -> str:
    """The transpose of :func:`format_summary`: one line per column, one column per method (%)."""
    columns: List[str] = []
    for s in summaries.values():
        columns += [c for c in s if c not in columns]
    names = list(summaries)
    labels = [describe(c) for c in columns]
    width = max(len(x) for x in labels)
    widths = [max(len(n), 6) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for c, label in zip(columns, labels):
        cells = [(f"{100 * summaries[n][c]:.1f}" if c in summaries[n] else "-").rjust(w) for n, w in zip(names, widths)]
        lines.append(label.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(lines)


def radius_curve(rows, attack: str, modalities: str) -> Tuple[List[float], List[float]]:
    """(radii, accuracies) of one attack on one modality set, the clean accuracy at radius 0."""
    pts = {float(r["radius"]): float(r["accuracy"]) for r in rows
           if r["attack"] == attack and r["modalities"] == modalities and r["radius"] is not None
           and not math.isnan(float(r["radius"]))}
    if attack != "certified":
        clean = [r for r in rows if r["attack"] == "clean"]
        if clean:
            pts.setdefault(0.0, float(clean[0]["accuracy"]))
    radii = sorted(pts)
    return radii, [pts[r] for r in radii]


def plot_radius_curves(runs: Mapping[str, Any], modalities: Sequence[str], path: str, title: str = "") -> str:
    """Accuracy vs l2 radius, one panel per attacked set (joint PGD, PGD on each modality, certified),
    one line per method. ``runs`` maps method -> evaluation rows. Writes a PNG and returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    joint = "+".join(modalities)
    panels = [("PGD-l2", joint, "l2-PGD on all modalities")]
    panels += [("PGD-l2", m, f"l2-PGD on {m} only") for m in modalities]
    panels += [("certified", joint, "certified (empirical Lipschitz)")]
    fig = Figure(figsize=(3.6 * len(panels), 3.3), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (attack, mods, label) in zip(axes, panels):
        for i, (name, rows) in enumerate(runs.items()):
            radii, acc = radius_curve(rows, attack, mods)
            ax.plot(radii, [100 * a for a in acc], marker="o", markersize=3, label=name, color=f"C{i}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("l2 radius (normalised units)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path
