"""Shared plumbing of the example scripts: flags, data, model selection, evaluation, saving.

Not part of the library. Every training script in this folder is an ordinary PyTorch loop; what they
share comes from :mod:`crmt_plugin.benchmark` (the machinery behind ``crmt-benchmark``), so the
examples and the published matrix measure the same way:

* :func:`parse_args` - the common flags (``--dataset`` / ``--data FILE.npz``, ``--epochs --seed
  --device --out --limit --radius`` ...);
* :func:`setup` -> :class:`Run` - seeds, the data (AV digits, mfeat, or any ``crmt-benchmark``
  ``.npz``), the model, the training attack, a progress bar, model selection on the validation split
  (:class:`crmt_plugin.benchmark.recipes.BestOnValidation`);
* :meth:`Run.finish` - the evaluation of ``crmt-benchmark`` on the test split
  (:func:`crmt_plugin.benchmark.evaluate.evaluate`: strong and gradient-free attacks, each modality
  missing, certified accuracy), ``model.pt`` and ``metrics.json``.

Run any script from the repository root, e.g. ``python examples/crmt_jt.py --epochs 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from crmt_plugin._optional import progress_bar  # noqa: E402
from crmt_plugin.attacks import PGD  # noqa: E402
from crmt_plugin.benchmark.data import batches, from_splits, load_npz  # noqa: E402
from crmt_plugin.benchmark.evaluate import EvalConfig, evaluate  # noqa: E402
from crmt_plugin.benchmark.recipes import BestOnValidation, Trained, accuracy, new_model  # noqa: E402
from crmt_plugin.datasets import load_av_digits, load_mfeat  # noqa: E402
from crmt_plugin.models import AVDigitsNet, MultiViewMLP  # noqa: E402

# Per-dataset defaults: epochs of step 1, the l2 radius of the evaluation and of the training attack.
DATASETS = {
    "av": dict(epochs=8, radius=2.0, train_eps=1.0),
    "mfeat": dict(epochs=20, radius=2.0, train_eps=1.0),
    "file": dict(epochs=30, radius=1.0, train_eps=1.0),
}


def parse_args(description: str, argv: Optional[Sequence[str]] = None, crmt: bool = False) -> argparse.Namespace:
    """The flags every example takes; ``crmt=True`` adds the CRMT ones (``--rho --temperature ...``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("av", "mfeat"), default="av",
                   help="av: audio-visual digits (2 modalities, default); mfeat: UCI digits, 6 views")
    p.add_argument("--data", default=None, help="or any crmt-benchmark .npz (x_<name>, y, optional split)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: av 8, mfeat 20, file 30)")
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
    p.add_argument("--radius", type=float, default=None, help="l2 radius of the evaluation (default 2; file 1)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="steps of the strong evaluation attack (default: strong_attack's preset)")
    p.add_argument("--eval-restarts", type=int, default=None,
                   help="restarts of the strong evaluation attack (default: strong_attack's preset)")
    p.add_argument("--queries", type=int, default=1000, help="queries of the gradient-free evaluation attack")
    p.add_argument("--max-test", type=int, default=None, help="attack only the first N test samples")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples of each split (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.add_argument("--no-table", action="store_true", help="do not print the result table")
    if crmt:
        p.add_argument("--rho", type=float, default=None, help="CRMT: margin weight (default: crmt_loss's)")
        p.add_argument("--temperature", type=float, default=None,
                       help="CRMT: margin temperature (default: crmt_loss's)")
        p.add_argument("--integration-epochs", type=int, default=None,
                       help="CRMT step 2: epochs on the cached logits (default: fit_integration's)")
    args = p.parse_args(argv)
    defaults = DATASETS["file" if args.data else args.dataset]
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.radius = defaults["radius"] if args.radius is None else args.radius
    args.train_eps = defaults["train_eps"] if args.train_eps is None else args.train_eps
    return args


def crmt_kwargs(args: argparse.Namespace) -> Dict[str, float]:
    """``rho`` / ``temperature`` for ``crmt_loss`` when given on the command line (else its defaults)."""
    return {k: getattr(args, k) for k in ("rho", "temperature") if getattr(args, k, None) is not None}


def step2_kwargs(args: argparse.Namespace, run: "Run") -> Dict[str, Any]:
    """``fit_integration`` keywords: the validation split, and ``--integration-epochs`` when given."""
    out: Dict[str, Any] = {"val_loader": run.val_loader}
    if getattr(args, "integration_epochs", None) is not None:
        out["epochs"] = args.integration_epochs
    return out


class Run:
    """Everything a training script needs besides its own loop.

    Attributes:
        args: the parsed flags.
        data: the :class:`~crmt_plugin.benchmark.data.BenchmarkData` (train / validation / test).
        model: a fresh late-fusion model; its fusion ``nn.Linear`` is at ``run.head``.
        head: ``"fusion.fc"`` (the reference models of AV digits / mfeat) or ``"fusion"`` (a .npz).
        train_loader / val_loader: lists of ``({name: (B, ...)}, y)`` batches.
    """

    def __init__(self, args: argparse.Namespace, method: str) -> None:
        self.args, self.method = args, method
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.dataset = os.path.splitext(os.path.basename(args.data))[0] if args.data else args.dataset
        if args.data:
            self.data = load_npz(args.data, data_seed=args.data_seed)
            if args.limit:
                keep = torch.cat([torch.nonzero(self.data.split == c).flatten()[:args.limit] for c in (0, 1, 2)])
                self.data = type(self.data)(x={n: t[keep] for n, t in self.data.x.items()}, y=self.data.y[keep],
                                            split=self.data.split[keep], num_classes=self.data.num_classes,
                                            split_given=True, path=self.data.path)
            self.model: nn.Module = new_model(self.data)
            self.head = "fusion"
        elif args.dataset == "av":
            self.data = from_splits(load_av_digits(seed=args.data_seed), limit=args.limit)
            self.model = AVDigitsNet(feature_dim=64, num_classes=self.data.num_classes)
            self.head = "fusion.fc"
        else:
            self.data = from_splits(load_mfeat(seed=args.data_seed), limit=args.limit)
            dims = {name: shape[0] for name, shape in self.data.sample_shapes().items()}
            self.model = MultiViewMLP(dims, feature_dim=32, num_classes=self.data.num_classes)
            self.head = "fusion.fc"
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.attack_generator = torch.Generator().manual_seed(args.seed + 1)
        self._train = self._on_device("train")
        self._val = self._on_device("validation")
        self.train_loader = list(batches(*self._train, args.batch_size))
        self.val_loader = list(batches(*self._val, args.batch_size))
        self.out = args.out or os.path.join("runs", f"{method}-{self.dataset}-seed{args.seed}")
        self.selection = BestOnValidation()
        self.history: List[Dict[str, float]] = []
        self._bar = None
        self._started = time.time()
        self._trained: Optional[float] = None
        self._loss_sum, self._loss_n = 0.0, 0

    def _on_device(self, part: str) -> Tuple[Dict[str, Tensor], Tensor]:
        x, y = self.data.part(part)
        return {n: t.to(self.device) for n, t in x.items()}, y.to(self.device)

    # -- training -----------------------------------------------------------------------------------

    def train_attack(self, **changes: Any) -> PGD:
        """The training attack of PGD-AT / TRADES: l2 PGD, one joint budget over all modalities."""
        return PGD(self.args.train_eps, norm="l2", steps=self.args.train_steps, generator=self.attack_generator,
                   **changes)

    def epochs(self) -> Iterator[int]:
        """1 .. epochs, with a progress bar (loss and validation accuracy in its postfix)."""
        epochs: Any = range(1, self.args.epochs + 1)
        if not self.args.quiet:
            self._bar = epochs = progress_bar(epochs, desc=f"{self.method} ({self.dataset})", unit="epoch")
        for epoch in epochs:
            self._loss_sum, self._loss_n = 0.0, 0
            yield epoch
        self._trained = time.time()

    def batches(self) -> Iterator[Tuple[Dict[str, Tensor], Tensor]]:
        """The training batches (shuffled, on the device; batches of one sample skipped for BatchNorm)."""
        for inputs, y in batches(*self._train, self.args.batch_size, shuffle=True, generator=self.generator):
            if y.shape[0] > 1:
                yield inputs, y

    def log(self, loss: Tensor) -> None:
        """Record a training loss (shown in the progress bar)."""
        self._loss_sum += float(loss.detach())
        self._loss_n += 1

    def validate(self, model: nn.Module) -> float:
        """Validation accuracy; keeps a copy of the best model so far (model selection on val only)."""
        acc = accuracy(model, *self._val)
        loss = self._loss_sum / max(self._loss_n, 1)
        self.history.append({"epoch": len(self.history) + 1, "train_loss": loss, "val_accuracy": acc})
        self.selection.update(model, acc)
        if hasattr(self._bar, "set_postfix"):
            self._bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.3f}", best=f"{self.selection.best_val:.3f}")
        return acc

    def restore_best(self, model: nn.Module) -> None:
        """Load the weights of the epoch with the best validation accuracy."""
        self.selection.restore(model)

    # -- evaluation ---------------------------------------------------------------------------------

    def eval_config(self) -> EvalConfig:
        a = self.args
        return EvalConfig(steps=a.eval_steps, restarts=a.eval_restarts, queries=a.queries, max_test=a.max_test)

    def finish(self, model: nn.Module, crmt=None, lipschitz=None, **extra: Any) -> Dict[str, Any]:
        """Evaluate on the test split, save ``model.pt`` and ``metrics.json`` in ``--out``, print the table.

        ``model`` is the user's model (for CRMT: with the CRMT head inside); ``crmt`` and ``lipschitz``
        add the CRMT certificate. ``model.pt`` is ``torch.save`` of the plain module (for CRMT:
        ``crmt.export()``). Returns the metrics (``metrics["summary"]``: the accuracies).
        """
        trained_at = self._trained or time.time()
        model.eval()
        plain = crmt.export().eval() if crmt is not None else model
        step2 = extra.get("step2")
        trained = Trained(method=self.method, seed=self.args.seed, model=plain, crmt=crmt, lipschitz=lipschitz,
                          step2=step2 if isinstance(step2, dict) else None, best_val=self.selection.best_val,
                          best_epoch=self.selection.best_epoch, train_seconds=trained_at - self._started)
        row = evaluate(trained, self.data, self.args.radius, self.eval_config(), seed=self.args.seed,
                       device=self.device, head=self.head)
        summary = {k: v for k, v in row.items() if isinstance(v, float) and not k.endswith("seconds")
                   and k != "val_accuracy"}
        metrics = {
            "method": self.method, "dataset": self.dataset, "seed": self.args.seed, "data_seed": self.args.data_seed,
            "epochs": self.args.epochs, "radius": self.args.radius, "best_epoch": self.selection.best_epoch,
            "val_accuracy": self.selection.best_val, "train_seconds": trained_at - self._started,
            "eval_seconds": time.time() - trained_at, "args": vars(self.args), "history": self.history,
            "lipschitz": lipschitz.to_dict() if lipschitz is not None else None,
            "integration_weights": ({n: a.tolist() for n, a in crmt.integration_weights().items()}
                                    if crmt is not None else None),
            "summary": summary, "row": row, **extra,
        }
        os.makedirs(self.out, exist_ok=True)
        torch.save(plain, os.path.join(self.out, "model.pt"))
        if crmt is not None:
            torch.save(crmt.state_dict(), os.path.join(self.out, "crmt.pt"))
        with open(os.path.join(self.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=_json_default)
        if not (self.args.quiet or self.args.no_table):
            print(f"\n{self.method} on {self.dataset}, seed {self.args.seed}: best validation accuracy "
                  f"{self.selection.best_val:.3f} (epoch {self.selection.best_epoch}); test split, l2 radius "
                  f"{self.args.radius:g}:")
            print(format_summary({self.method: summary}))
            print(f"saved {self.out}/model.pt and metrics.json")
        return metrics


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return str(value)


def setup(args: argparse.Namespace, method: str) -> Run:
    return Run(args, method)


def format_summary(summaries: Dict[str, Dict[str, float]]) -> str:
    """One line per accuracy, one column per method (%)."""
    names = list(summaries)
    keys: List[str] = []
    for s in summaries.values():
        keys += [k for k in s if k not in keys]
    width = max(len(k) for k in keys)
    lines = [" " * width + "  " + "  ".join(n.rjust(8) for n in names)]
    for k in keys:
        cells = [(f"{100 * summaries[n][k]:.1f}" if summaries[n].get(k) is not None else "-").rjust(max(8, len(n)))
                 for n in names]
        lines.append(k.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(lines)
