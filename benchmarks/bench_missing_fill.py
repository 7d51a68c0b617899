"""Benchmark 11: the cost of ``crmt.missing_fill_loss`` in a CRMT-JT training step.

    python benchmarks/bench_missing_fill.py            # the benchmark's models of watch and segment
    python benchmarks/bench_missing_fill.py --quick

One step = zero_grad -> crmt(inputs) -> crmt_loss [+ crmt.missing_fill_loss(train mean)] -> backward -> Adam.step,
on the model ``crmt-benchmark`` builds for the data set (``recipes.new_model``: 1-D CNN encoders with BatchNorm on
watch's (3, 100) sensor windows, MLP encoders on segment's feature groups), its batch size, a real training batch.
The two steps are timed in interleaved rounds on deep copies of one wrapped model; the ratio is the median over
rounds of (with term) / (without), CPU time of this process, one torch thread. Needs
``runs/benchmark-data/<name>.npz`` (``python experiments/make_datasets.py``).
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import _common as C
from crmt_plugin import CRMTWrapper, crmt_loss
from crmt_plugin.benchmark.data import load_npz
from crmt_plugin.benchmark.recipes import TrainConfig, new_model, training_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_fn(crmt, inputs, y, fill):
    optimizer = torch.optim.Adam(crmt.parameters(), lr=1e-3)

    def step():
        crmt.train()
        optimizer.zero_grad(set_to_none=True)
        loss = crmt_loss(crmt(inputs), y)
        if fill is not None:
            loss = loss + crmt.missing_fill_loss(fill)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = C.parse_args(__doc__.split("\n\n")[0], repeats=40)
    rows = []
    for name in ("watch", "segment"):
        data = load_npz(os.path.join(REPO, "runs", "benchmark-data", f"{name}.npz"))
        torch.manual_seed(0)
        model = new_model(data, "bn", TrainConfig(), 0)
        crmt = CRMTWrapper(model, head="fusion", modalities=model.feature_dims, integration_init=0.1)
        x, y = data.part("train")
        batch = training_schedule(int(y.shape[0]), TrainConfig()).batch_size
        inputs, y = {n: t[:batch] for n, t in x.items()}, y[:batch]
        fill = {n: m.expand(data.x[n].shape[1:]).clone() for n, m in data.train_mean().items()}
        plain, with_term = copy.deepcopy(crmt), copy.deepcopy(crmt)
        samples = C.interleaved({"crmt_loss": step_fn(plain, inputs, y, None),
                                 "crmt_loss + missing_fill_loss": step_fn(with_term, inputs, y, fill)},
                                repeats=args.repeats, warmup=args.warmup)
        rows.append([name, batch, C.ms(samples.median("crmt_loss")),
                     C.ms(samples.median("crmt_loss + missing_fill_loss")),
                     f"{samples.ratio('crmt_loss + missing_fill_loss', 'crmt_loss'):.3f}"])
    print(C.machine())
    print(C.table(["data (model)", "batch", "CRMT-JT step, ms", "+ missing_fill_loss, ms", "ratio"], rows))


if __name__ == "__main__":
    main()
