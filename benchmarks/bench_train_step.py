"""Benchmark 1: one training step of CRMT (CRMTWrapper + crmt_loss) vs the same model's plain JT
step (nn.Linear fusion head + cross-entropy): time and peak memory.

    python benchmarks/bench_train_step.py            # both models, markdown tables
    python benchmarks/bench_train_step.py --quick    # smoke test

A step is: zero_grad(set_to_none) -> forward -> loss -> backward -> SGD(momentum 0.9).step().
The JT and CRMT models are deep copies of one model (CRMT wraps its copy, converting the trained
linear head), fed the same batch. Timing: warm-up rounds, then interleaved rounds (JT, CRMT, CRMT,
JT, ...); the ratio is the median over rounds of CRMT/JT within the same round.
``--against REV`` adds CRMT with the head.py of revision REV (the rest from the working tree);
``--retraction`` adds the retraction prototype of benchmarks/_common.py (not gradient-identical).
Memory: peak of torch CPU allocations during one step (profiler allocation events, see
benchmarks/_common.py), and the bytes autograd saves for backward.
"""

from __future__ import annotations

import copy
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F
from torch import nn

import _common as C
from crmt_plugin import CRMTWrapper, crmt_loss


class TwoMLP(nn.Module):
    """Synthetic two-encoder late-fusion model: MLP encoders -> d-dim features -> nn.Linear(2d, K)."""

    def __init__(self, in_dim: int, hidden: int, d: int, num_classes: int) -> None:
        super().__init__()

        def mlp() -> nn.Module:
            return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.ReLU())

        self.encoders = nn.ModuleDict({"audio": mlp(), "visual": mlp()})
        self.widths = {"audio": d, "visual": d}
        self.fusion = nn.Module()
        self.fusion.fc = nn.Linear(2 * d, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.fusion.fc(torch.cat([self.encoders["audio"](audio), self.encoders["visual"](visual)], dim=1))


def av_model():
    """AVDigitsNet from crmt_plugin.models (audio (B, 13, 32) MFCC frames, image (B, 1, 28, 28))."""
    from crmt_plugin.models import AVDigitsNet

    model = AVDigitsNet(feature_dim=64, num_classes=10)
    return model, dict(model.feature_dims), (lambda b: {"audio": torch.randn(b, 13, 32),
                                                       "image": torch.randn(b, 1, 28, 28)}), 10


def synthetic_model(in_dim: int, hidden: int, d: int = 512, num_classes: int = 31):
    model = TwoMLP(in_dim, hidden, d, num_classes)
    return model, {"audio": d, "visual": d}, (lambda b: {"audio": torch.randn(b, in_dim),
                                                          "visual": torch.randn(b, in_dim)}), num_classes


def wrap_at_revision(model: nn.Module, modalities, rev: str) -> CRMTWrapper:
    """A CRMTWrapper whose head is the CRMTHead of git revision ``rev`` (for before/after runs)."""
    old_head = C.load_revision(rev, "head")
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=modalities)
    linear = nn.Linear(crmt.head.in_features, crmt.num_classes)
    with torch.no_grad():
        linear.weight.copy_(crmt.head.fused_weight())
        linear.bias.copy_(crmt.head.bias)
    model.fusion.fc = old_head.CRMTHead.from_linear(linear, modalities)
    return crmt


def steps(model: nn.Module, modalities, inputs, y, against: str = "", retraction: bool = False):
    jt = copy.deepcopy(model).train()
    crmt = CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=modalities).train()
    opt_jt = torch.optim.SGD(jt.parameters(), lr=1e-3, momentum=0.9)
    opt_crmt = torch.optim.SGD(crmt.parameters(), lr=1e-3, momentum=0.9)

    def jt_forward():
        return F.cross_entropy(jt(**inputs), y)

    def crmt_forward():
        return crmt_loss(crmt(inputs), y, rho=2.0)

    extra = {}
    if against:
        old = wrap_at_revision(copy.deepcopy(model), modalities, against).train()
        opt_old = torch.optim.SGD(old.parameters(), lr=1e-3, momentum=0.9)

        def old_forward():  # the head of REV, everything else (loss, wrapper) as in the working tree
            return crmt_loss(old(inputs), y, rho=2.0)

        extra = {"old": (opt_old, old_forward)}

    def step(opt, forward, after_step=None):
        def run():
            opt.zero_grad(set_to_none=True)
            forward().backward()
            opt.step()
            if after_step is not None:
                after_step()
        return run

    def step_after_zero_grad(opt, forward):
        def run():  # what the memory measurement profiles: gradients already freed
            forward().backward()
            opt.step()
        return run

    timed = {"JT": step(opt_jt, jt_forward), "CRMT": step(opt_crmt, crmt_forward)}
    timed.update({f"CRMT@{against}": step(o, f) for o, f in extra.values()})
    if retraction:  # the alternative to the cache: V kept orthonormal (benchmarks/_common.retraction_head)
        ret = CRMTWrapper(copy.deepcopy(model), head="fusion.fc", modalities=modalities).train()
        retract = C.retraction_head(ret)
        opt_ret = torch.optim.SGD(ret.parameters(), lr=1e-3, momentum=0.9)
        timed["CRMT retraction"] = step(opt_ret, lambda: crmt_loss(ret(inputs), y, rho=2.0), retract)
    return (
        timed,
        {"JT": jt_forward, "CRMT": crmt_forward},
        {"JT": (opt_jt, step_after_zero_grad(opt_jt, jt_forward)),
         "CRMT": (opt_crmt, step_after_zero_grad(opt_crmt, crmt_forward))},
    )


AGAINST: list = []
RETRACTION: list = []


def run_case(label: str, built, batch: int, args) -> list:
    torch.manual_seed(0)
    model, modalities, make_inputs, num_classes = built
    inputs = make_inputs(batch)
    y = torch.randint(0, num_classes, (batch,))
    step_fns, forward_fns, profiled = steps(model, modalities, inputs, y, args.against, args.retraction)
    samples = C.interleaved(step_fns, repeats=args.repeats, warmup=args.warmup, inner=args.inner)
    jt, cr = samples.median("JT"), samples.median("CRMT")
    if args.against:
        old = f"CRMT@{args.against}"
        AGAINST.append([label, batch, C.ms(samples.median(old)), C.ms(samples.median("CRMT")),
                        C.ms(samples.median(old) - jt), C.ms(cr - jt),
                        f"{samples.ratio(old, 'JT'):.3f}", f"{samples.ratio('CRMT', 'JT'):.3f}",
                        f"{samples.ratio('CRMT', old):.3f}"])
    if args.retraction:
        RETRACTION.append([label, batch, C.ms(samples.median("CRMT retraction")),
                           f"{samples.ratio('CRMT retraction', 'JT'):.3f}",
                           f"{samples.ratio('CRMT retraction', 'CRMT'):.3f}"])
    peaks = {n: [] for n in profiled}
    for _ in range(3):  # allocations are deterministic; 3 runs guard against a profiler hiccup
        for name, (opt, fn) in profiled.items():
            opt.zero_grad(set_to_none=True)  # last step's gradients freed outside the measurement
            peaks[name].append(C.peak_allocated_bytes(fn))
    peak = {n: max(v) for n, v in peaks.items()}
    saved = {n: C.saved_tensor_bytes(fn) for n, fn in forward_fns.items()}
    return [
        label, batch, C.ms(jt), C.ms(cr), f"{samples.ratio('CRMT', 'JT'):.3f}", C.ms(cr - jt),
        f"{samples.ratio('CRMT', 'JT', 'wall'):.3f}",
        C.mib(peak["JT"]), C.mib(peak["CRMT"]), f"{peak['CRMT'] / peak['JT']:.4f}",
        C.mib(saved["JT"]), C.mib(saved["CRMT"]),
    ]


def main() -> None:
    def extra(p):
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--inner", type=int, default=3, help="steps per timed sample")
        p.add_argument("--in-dim", type=int, default=1024, help="synthetic MLP input width")
        p.add_argument("--hidden", type=int, default=1024, help="synthetic MLP hidden width")
        p.add_argument("--cases", default="av,synthetic", help="comma list of av, synthetic, sweep")
        p.add_argument("--against", default="", metavar="REV",
                       help="also time CRMT with the head.py of git revision REV (before/after)")
        p.add_argument("--retraction", action="store_true",
                       help="also time the retraction prototype (V kept orthonormal, no QR in the forward)")

    args = C.parse_args(__doc__.splitlines()[0], repeats=40, extra=extra)
    print(C.machine())
    print()
    cases = args.cases.split(",")
    rows = []
    if "av" in cases:
        rows.append(run_case("AVDigitsNet (K=10, d=64+64)", av_model(), args.batch, args))
    if "synthetic" in cases:
        rows.append(run_case(f"2x MLP {args.in_dim}-{args.hidden}-512 (K=31, d=512+512)",
                             synthetic_model(args.in_dim, args.hidden), args.batch, args))
    if "sweep" in cases:
        for hidden in (256, 2048, 4096):
            rows.append(run_case(f"2x MLP {args.in_dim}-{hidden}-512 (K=31, d=512+512)",
                                 synthetic_model(args.in_dim, hidden), args.batch, args))
    print(C.table(
        ["model", "B", "JT step ms (CPU)", "CRMT step ms (CPU)", "ratio (CPU)", "overhead ms (CPU)",
         "ratio (wall)", "JT peak MiB", "CRMT peak MiB", "peak ratio", "JT saved MiB", "CRMT saved MiB"],
        rows,
    ))
    if AGAINST:
        print(f"\nBefore/after: head.py of {args.against} vs the working tree (same run, interleaved)\n")
        print(C.table(["model", "B", f"CRMT@{args.against} ms", "CRMT now ms", "overhead before ms",
                       "overhead now ms", "ratio before", "ratio now", "now/before"], AGAINST))
    if RETRACTION:
        print("\nRetraction prototype (benchmarks/_common.retraction_head; not gradient-identical), same run\n")
        print(C.table(["model", "B", "retraction step ms", "retraction/JT", "retraction/CRMT"], RETRACTION))
    print(f"\n{args.repeats} interleaved rounds x {args.inner} steps after {args.warmup} warm-up rounds. "
          "Step times: medians over rounds of process CPU time; ratios: median over rounds of "
          "CRMT/JT within the round (CPU time, and wall-clock). Peak: torch CPU allocations above "
          "the live parameters/optimizer state during one step (profiler allocation events). Saved: "
          "distinct storages autograd keeps for backward.")


if __name__ == "__main__":
    main()
