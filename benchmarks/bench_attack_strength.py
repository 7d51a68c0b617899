"""How strong are our attacks, and what do they cost? Accuracy left by ours and by torchattacks'
APGD / Square on the quickstart's JT and CRMT-JT models (AV digits, seed 0, the first ``--n`` test
pairs, joint l2 budget), and today's ``strong_attack`` against the one of a past git revision, side
by side (paired and interleaved: per model and radius both run back to back, in alternating order).

    OMP_NUM_THREADS=1 python benchmarks/bench_attack_strength.py                 # trains if needed
    OMP_NUM_THREADS=1 python benchmarks/bench_attack_strength.py --checkpoints runs/quickstart --n 200 \
        --against 5db2249                       # the strong_attack of 5db2249 (before the cascade) too

Checkpoints: ``<checkpoints>/jt/model.pt`` and ``<checkpoints>/crmt_jt/model.pt`` (the plain
``AVDigitsNet(feature_dim=64)`` module, as ``examples/quickstart.py`` writes it, or its state dict; the
CRMT-JT one is the exported plain model, same logits). Missing ones are trained by running the quickstart.

``--against REV`` loads ``crmt_plugin/attacks/`` as it was at git revision ``REV`` (``git show``, into
a temporary package next to the working tree's, nothing of the library changed) and times its
``strong_attack`` (defaults) next to today's presets (``--presets``).

torchattacks (3.5.1) takes one tensor in [0, 1]: both modalities are flattened, concatenated and
mapped into [0, 1] with ONE common affine map ``z = (x - lo) / scale`` (``lo``/``scale`` from the
batch's range widened by the radius, so the box never binds for the unbounded audio), so an l2
ball stays an l2 ball with ``eps_packed = eps / scale``; a small module unpacks, clamps the image
to its valid range and calls the model. The packed vector is padded to a square (1, 35, 35) image
(Square needs square images; the 25 padding entries are ignored by the model). Every adversarial
batch is checked against the budget in input units before it is counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from crmt_plugin.attacks import PGD, Square, fast_attack, strong_attack  # noqa: E402
from crmt_plugin.attacks.worst import PRESETS  # noqa: E402
from crmt_plugin.datasets import load_av_digits  # noqa: E402
from crmt_plugin.models import AVDigitsNet  # noqa: E402

NAMES = ("audio", "image")


class Packed(nn.Module):
    """(B, 1, H, H) in [0, 1] -> unpack, clamp the image to its valid range -> the model's logits."""

    def __init__(self, model: nn.Module, shapes: Mapping[str, Tuple[int, ...]], lo: float, scale: float,
                 bounds: Mapping[str, Tuple[float, float]], side: int) -> None:
        super().__init__()
        self.model, self.shapes, self.lo, self.scale = model, dict(shapes), lo, scale
        self.bounds, self.side = bounds, side
        self.sizes = {n: math.prod(s) for n, s in self.shapes.items()}

    def pack(self, inputs: Mapping[str, Tensor]) -> Tensor:
        flat = torch.cat([inputs[n].reshape(len(inputs[n]), -1) for n in self.shapes], dim=1)
        z = (flat - self.lo) / self.scale
        pad = self.side * self.side - z.shape[1]
        z = torch.cat([z, torch.full((z.shape[0], pad), 0.5, dtype=z.dtype)], dim=1)
        return z.reshape(-1, 1, self.side, self.side)

    def unpack(self, z: Tensor) -> Dict[str, Tensor]:
        flat = z.reshape(z.shape[0], -1) * self.scale + self.lo
        out, start = {}, 0
        for n, shape in self.shapes.items():
            x = flat[:, start:start + self.sizes[n]].reshape((-1,) + shape)
            lo, hi = self.bounds.get(n, (-math.inf, math.inf))
            out[n] = x.clamp(lo, hi) if math.isfinite(lo) or math.isfinite(hi) else x
            start += self.sizes[n]
        return out

    def forward(self, z: Tensor) -> Tensor:
        return self.model(self.unpack(z))


def load_models(checkpoints: str, splits) -> Dict[str, nn.Module]:
    paths = {"JT": os.path.join(checkpoints, "jt", "model.pt"),
             "CRMT-JT": os.path.join(checkpoints, "crmt_jt", "model.pt")}
    if not all(os.path.exists(p) for p in paths.values()):
        print(f"training the quickstart's models into {checkpoints} (examples/quickstart.py)", flush=True)
        sys.path.insert(0, os.path.join(REPO, "examples"))
        import quickstart

        quickstart.main(["--out", checkpoints, "--quiet"])
    models = {}
    for name, path in paths.items():
        saved = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints
        if isinstance(saved, nn.Module):  # what examples/common.py writes: the plain module
            models[name] = saved.eval()
            continue
        net = AVDigitsNet(feature_dim=64, num_classes=splits.num_classes)  # older checkpoints: a state dict
        net.load_state_dict(saved)
        models[name] = net.eval()
    return models


def load_attacks_at(rev: str):
    """``crmt_plugin.attacks`` as it was at git revision ``rev`` (every file of the package, read with
    ``git show``), imported as ``crmt_plugin._attacks_at_<rev>``: its relative imports of the rest of
    the library (``.._runtime``, ``..errors``) resolve to the working tree's."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:crmt_plugin/attacks"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    folder = tempfile.mkdtemp(prefix="crmt_attacks_")
    for name in listing:
        if name.endswith(".py"):
            source = subprocess.run(["git", "show", f"{rev}:crmt_plugin/attacks/{name}"], cwd=REPO, check=True,
                                    capture_output=True, text=True).stdout
            with open(os.path.join(folder, name), "w") as f:
                f.write(source)
    package = f"crmt_plugin._attacks_at_{rev}"
    spec = importlib.util.spec_from_file_location(package, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return module


def correct(model: nn.Module, inputs: Mapping[str, Tensor], y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(dict(inputs)).argmax(1) == y


def check_budget(adv: Mapping[str, Tensor], x: Mapping[str, Tensor], eps: float, bounds) -> None:
    size = sum((adv[n].double() - x[n].double()).flatten(1).pow(2).sum(1) for n in NAMES).sqrt()
    assert bool((size <= eps * (1 + 1e-5)).all()), f"budget exceeded: {size.max().item()} > {eps}"
    for n, (lo, hi) in bounds.items():
        assert adv[n].min() >= lo - 1e-6 and adv[n].max() <= hi + 1e-6, f"{n} left its valid range"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=os.path.join("runs", "quickstart"))
    p.add_argument("--n", type=int, default=300, help="first N test pairs")
    p.add_argument("--skip", type=int, default=0, help="start at test pair SKIP (a held-out check)")
    p.add_argument("--radii", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--square-queries", type=int, default=2000)
    p.add_argument("--skip-torchattacks", action="store_true")
    p.add_argument("--models", nargs="+", default=["JT", "CRMT-JT"], help="which of JT, CRMT-JT")
    p.add_argument("--presets", nargs="+", default=["standard", "full"], choices=sorted(PRESETS),
                   help="strong_attack presets to run")
    p.add_argument("--against", default="", metavar="REV",
                   help="also run the strong_attack of git revision REV (paired with today's, interleaved)")
    p.add_argument("--no-extra", action="store_true", help="skip PGD-10 and our Square")
    p.add_argument("--pgd100", action="store_true", help="also our PGD with 100 steps x 3 restarts")
    args = p.parse_args(argv)
    started, cpu_started = time.time(), time.process_time()
    splits = load_av_digits(seed=0)
    models = load_models(args.checkpoints, splits)
    items = [splits.test[i] for i in range(args.skip, args.skip + args.n)]
    x = {n: torch.stack([it[0][n] for it in items]) for n in NAMES}
    y = torch.tensor([int(it[1]) for it in items])
    bounds = {n: b for n, b in splits.bounds.items() if math.isfinite(b[0]) or math.isfinite(b[1])}
    shapes = {n: tuple(x[n].shape[1:]) for n in NAMES}
    side = math.ceil(math.sqrt(sum(math.prod(s) for s in shapes.values())))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    paired: Dict[str, Callable[[float], Callable]] = {}  # timed side by side, in alternating order
    if args.against:
        old = load_attacks_at(args.against)
        paired[f"strong_attack@{args.against}"] = lambda r: old.strong_attack(r, bounds=bounds, generator=gen())
    for preset in args.presets:
        paired[f"strong_attack preset={preset}"] = (
            lambda r, preset=preset: strong_attack(r, bounds=bounds, generator=gen(), preset=preset))
    ours: Dict[str, Callable[[float], Callable]] = {}
    if not args.no_extra:
        ours = {
            "our PGD-10 (fast_attack)": lambda r: fast_attack(r, bounds=bounds, generator=gen()),
            f"our Square ({args.square_queries} queries)": lambda r: Square(
                r, queries=args.square_queries, bounds=bounds, generator=gen()),
        }
    if args.pgd100:
        ours["our PGD 100 steps x 3"] = lambda r: PGD(r, steps=100, restarts=3, bounds=bounds, generator=gen())
    theirs = {}
    if not args.skip_torchattacks:
        import torchattacks

        theirs = {
            "APGD-CE": lambda m, e: torchattacks.APGD(m, norm="L2", eps=e, steps=100, loss="ce", seed=0),
            "APGD-DLR": lambda m, e: torchattacks.APGD(m, norm="L2", eps=e, steps=100, loss="dlr", seed=0),
            f"Square ({args.square_queries} queries)": lambda m, e: torchattacks.Square(
                m, norm="L2", eps=e, n_queries=args.square_queries, n_restarts=1, seed=0),
        }
    columns = (list(paired) + list(ours) + [f"torchattacks {k}" for k in theirs]
               + (["worst of torchattacks"] if theirs else []) + ["worst of all"])
    table: List[List[str]] = []
    seconds: Dict[str, float] = {c: 0.0 for c in columns}
    case_seconds: List[Dict[str, float]] = []
    case_cpu: List[Dict[str, float]] = []
    cpu: Dict[str, float] = {}
    case = 0
    for model_name, model in models.items():
        if model_name not in args.models:
            continue
        clean = correct(model, x, y)
        for r in args.radii:
            results: Dict[str, Tensor] = {}
            this: Dict[str, float] = {}
            this_cpu: Dict[str, float] = {}
            order = list(paired) if case % 2 == 0 else list(reversed(paired))
            for label in order + list(ours):
                make = paired.get(label) or ours[label]
                t0, c0 = time.time(), time.process_time()
                adv = make(r)(model, x, y)
                this[label] = time.time() - t0
                cpu[label] = cpu.get(label, 0.0) + time.process_time() - c0
                this_cpu[label] = time.process_time() - c0
                seconds[label] += this[label]
                check_budget(adv, x, r, bounds)
                results[label] = correct(model, adv, y) & clean
            case += 1
            flat = torch.cat([x[n].reshape(len(y), -1) for n in NAMES], dim=1)
            lo, hi = float(flat.min()) - r, float(flat.max()) + r
            packed = Packed(model, shapes, lo, hi - lo, bounds, side).eval()
            z = packed.pack(x)
            for label, make in theirs.items():
                t0, c0 = time.time(), time.process_time()
                torch.manual_seed(0)
                z_adv = make(packed, r / (hi - lo))(z, y)
                seconds[f"torchattacks {label}"] += time.time() - t0
                cpu[f"torchattacks {label}"] = cpu.get(f"torchattacks {label}", 0.0) + time.process_time() - c0
                adv = packed.unpack(z_adv)
                check_budget(adv, x, r, bounds)
                results[f"torchattacks {label}"] = correct(model, adv, y) & clean
            ta = [v for k, v in results.items() if k.startswith("torchattacks")]
            if ta:
                results["worst of torchattacks"] = torch.stack(ta).all(0)
            results["worst of all"] = torch.stack(list(results.values())).all(0)
            row = [f"{model_name}, r = {r:g}", f"{100 * clean.double().mean():.1f}"]
            row += [f"{100 * results[c].double().mean():.1f}" if c in results else "-" for c in columns]
            table.append(row)
            case_seconds.append(this)
            case_cpu.append(this_cpu)
            print(" | ".join(row) + "   seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in this.items()), flush=True)
    header = ["model, radius", "clean"] + columns
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print()
    if paired:
        names = list(paired)
        print("paired seconds, wall / CPU (same run, interleaved):")
        print("| model, radius | " + " | ".join(names) + " |")
        print("|---|" + "--:|" * len(names))
        for row, this, this_cpu in zip(table, case_seconds, case_cpu):
            print(f"| {row[0]} | " + " | ".join(f"{this[k]:.1f} / {this_cpu[k]:.1f}" for k in names) + " |")
        print("| total | " + " | ".join(f"{seconds[k]:.1f} / {cpu[k]:.1f}" for k in names) + " |")
        if args.against:
            base, base_cpu = seconds[names[0]], cpu[names[0]]
            print("ratio to " + names[0] + " (wall / CPU): " + ", ".join(
                f"{k} {seconds[k] / base:.3f} / {cpu[k] / base_cpu:.3f}" for k in names[1:]))
        print()
    print("seconds per attack, wall / CPU (all models and radii): " + ", ".join(
        f"{k} {v:.0f} / {cpu.get(k, 0.0):.0f}" for k, v in seconds.items() if v))
    print(f"wall time {time.time() - started:.0f} s, CPU time {time.process_time() - cpu_started:.0f} s "
          f"(torch threads: {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
