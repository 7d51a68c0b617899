"""Benchmark 9: one training step of the certified recipes on the Lipschitz encoders vs plain CE (JT) on the
same encoders: lip-jt (GloRo-style loss, plain head) and crmt-lip (CRMTWrapper + certified_loss).

    python benchmarks/bench_lipschitz_step.py            # AV digits shapes, batch 64, markdown table
    python benchmarks/bench_lipschitz_step.py --quick    # smoke test

A step is zero_grad -> forward -> loss -> backward -> Adam.step on deep copies of one
``lipschitz_model`` (the crmt-benchmark model of lip-jt / crmt-lip). crmt-lip's loss recomputes the encoders'
sound bound every ``REFRESH`` (10) steps (Fourier conv norms); the "mean" columns include that cost, the
"median" ones do not. Timing: interleaved rounds (benchmarks/_common.py), ratios per round.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402
from crmt_plugin import CRMTWrapper  # noqa: E402
from crmt_plugin.benchmark.data import BenchmarkData  # noqa: E402
from crmt_plugin.benchmark.lipschitz_models import lipschitz_loss, lipschitz_model  # noqa: E402


def av_like_data(n: int = 300) -> BenchmarkData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    x = {"audio": torch.randn(n, 13, 32, generator=g), "image": torch.randn(n, 1, 28, 28, generator=g)}
    split = torch.tensor(np.repeat([0, 1, 2], [n - 2 * (n // 5), n // 5, n // 5]))
    return BenchmarkData(x=x, y=y, split=split, num_classes=10, split_given=True, path="synthetic")


def main() -> None:
    args = C.parse_args(__doc__.split("\n\n")[0], repeats=40)
    data = av_like_data()
    torch.manual_seed(0)
    base = lipschitz_model(data)
    batch = {"audio": torch.randn(64, 13, 32), "image": torch.randn(64, 1, 28, 28)}
    y = torch.arange(64) % 10
    total = 10 * (args.repeats + args.warmup)

    def stepper(method: str):
        model = copy.deepcopy(base).train()
        crmt = CRMTWrapper(model, head="fusion", modalities=model.feature_dims) if method == "crmt-lip" else None
        loss_fn = None if method == "jt" else lipschitz_loss(method, model, crmt, 1.0, total)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(**batch), y) if loss_fn is None else loss_fn(batch, y)
            loss.backward()
            optimizer.step()

        return step

    candidates = {"jt (CE)": stepper("jt"), "lip-jt": stepper("lip-jt"), "crmt-lip": stepper("crmt-lip")}
    samples = C.interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
    print(C.machine())
    print(f"\nbatch 64, AV digits shapes (audio 13x32, image 1x28x28), {args.repeats} rounds, "
          f"{args.threads} thread(s)\n")
    print("| step | median CPU ms | mean CPU ms (refresh included) | median ratio to jt (CE) | mean ratio |")
    print("|---|--:|--:|--:|--:|")
    jt_mean = statistics.fmean(samples.cpu["jt (CE)"])
    for name in candidates:
        cpu = samples.cpu[name]
        print(f"| {name} | {1000 * statistics.median(cpu):.1f} | {1000 * statistics.fmean(cpu):.1f} | "
              f"{samples.ratio(name, 'jt (CE)'):.2f} | {statistics.fmean(cpu) / jt_mean:.2f} |")


if __name__ == "__main__":
    main()
