"""JT and CRMT-JT through a PyTorch Lightning ``Trainer``: the loops of jt.py / crmt_jt.py as a
``LightningModule``, step 2 by ``crmt_plugin.lightning.CRMTCallback`` at the end of ``fit``.

    python examples/lightning_crmt.py                      # both, AV digits (audio + image)
    python examples/lightning_crmt.py --method crmt-jt     # one of them

The same data, model, seed, batches, optimiser, model selection (best validation accuracy) and evaluation
as jt.py and crmt_jt.py (examples/common.py), so the numbers match theirs up to floating-point noise.
What Lightning adds: the training loop, the logger (CSV in --out, with the callback's crmt/... metrics:
uni-modal margins, integration weights, certified radius) and a checkpoint after step 2 (final.ckpt).
Needs the ``lightning`` extra: pip install lightning "torch==<your torch>".

Measured (2026-12-03, seed 0, 8 epochs, --max-test 300, --threads 1, lightning 2.6.6): every test-split
number equal to jt.py's / crmt_jt.py's, and the same best epoch (7), validation accuracy and a:
JT clean 97.0, worst joint 17.7, mean robust 35.9; CRMT-JT clean 99.3, worst joint 62.7, mean robust 73.0.
"""

import argparse
import os
import sys

import crmt_plugin
import torch
import torch.nn.functional as F

import common
from crmt_plugin.lightning import CRMTCallback, lightning_module

pl = lightning_module()  # lightning.pytorch (or pytorch_lightning)


class Batches:
    """An iterable of ``(inputs, y)`` batches Lightning can loop over, re-made on every pass: the training
    batches of ``run.batches()`` (shuffled exactly as the plain loop shuffles them) or a fixed list."""

    def __init__(self, make, length):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self):
        return self.length


class LateFusionModule(pl.LightningModule):
    """jt.py's / crmt_jt.py's loop body: cross-entropy, or ``crmt_loss`` on the wrapped model."""

    def __init__(self, model, args, crmt=None):
        super().__init__()
        self.model, self.crmt, self.args = model, crmt, args

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        if self.crmt is None:
            loss = F.cross_entropy(self.model(**inputs), y)
        else:
            loss = crmt_plugin.crmt_loss(self.crmt(inputs), y, **common.crmt_kwargs(self.args))
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, y = batch
        self.log("val_acc", (self.model(**inputs).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.args.lr, weight_decay=self.args.weight_decay)


class SelectOnValidation(pl.Callback):
    """The plain loops' model selection: validation accuracy after every epoch, the best epoch's
    weights restored when training ends (before CRMTCallback's step 2, which runs at the end of fit)."""

    def __init__(self, run):
        self.run = run

    def on_train_epoch_start(self, trainer, module):
        self.run._loss_sum, self.run._loss_n = 0.0, 0  # what run.epochs() does in the plain loops

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.run.log(outputs["loss"] if isinstance(outputs, dict) else outputs)

    def on_train_epoch_end(self, trainer, module):
        self.run.validate(module.model)

    def on_train_end(self, trainer, module):
        self.run.restore_best(module.model)


def train(args, method):
    run = common.setup(args, f"lightning-{method}")
    model = run.model
    crmt = None
    if method == "crmt-jt":
        crmt = crmt_plugin.CRMTWrapper(model, head=run.head, modalities=model.feature_dims, integration_init=0.1)
    module = LateFusionModule(model, args, crmt)
    steps = sum(1 for _ in run.batches())  # batches per epoch; the count shuffles once, so reset the generator:
    run.generator.manual_seed(args.seed)
    train_batches = Batches(run.batches, steps)
    val_batches = Batches(lambda: run.val_loader, len(run.val_loader))
    callbacks = [SelectOnValidation(run)]
    step2 = None
    if crmt is not None:
        # step 2 on the plain loop's (unshuffled) training batches; the validation split is the trainer's
        step2 = CRMTCallback(train_loader=run.train_loader, checkpoint_path=os.path.join(run.out, "final.ckpt"),
                             **{k: v for k, v in common.step2_kwargs(args, run).items() if k != "val_loader"})
        callbacks.append(step2)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu" if run.device.type == "cpu" else "auto",
                         devices=1, callbacks=callbacks, logger=pl.loggers.CSVLogger(run.out, name="logs"),
                         enable_checkpointing=False, enable_progress_bar=not args.quiet, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, train_batches, val_batches)
    if crmt is None:
        return run.finish(model)
    if not args.quiet:
        print("CRMTCallback logged: " + ", ".join(f"{k} {v:.4g}" for k, v in step2.metrics.items()))
    return run.finish(model, crmt, step2.lipschitz_used, step2=vars(step2.result))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=("jt", "crmt-jt", "both"), default="both")
    known, rest = pre.parse_known_args(argv)
    args = common.parse_args(__doc__ + "\n  --method jt|crmt-jt|both (default both)", rest, crmt=True)
    methods = ("jt", "crmt-jt") if known.method == "both" else (known.method,)
    base_out = args.out
    results = {}
    for method in methods:
        args.out = os.path.join(base_out, method) if base_out and len(methods) > 1 else base_out
        results[method] = train(args, method)
    if len(methods) > 1 and not (args.quiet or args.no_table):
        print("\nthrough Lightning, test split (%):")
        print(common.format_summary({f"L-{m}": results[m]["summary"] for m in methods}))
    return results


if __name__ == "__main__":
    main()
