"""Shared helpers of the benchmarks: machine description, interleaved (ABAB) timing with paired
ratios, CPU peak-memory measurement from the profiler's allocation events, markdown tables.

Not part of the library (``benchmarks/`` is not packaged); every script imports it with
``sys.path`` pointing at this folder, so ``python benchmarks/<script>.py`` works from the repo root.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)


def parse_args(description: str, repeats: int = 30, extra: Optional[Callable] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (each runs every candidate)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    return args


def machine() -> str:
    """One markdown line: what ran the benchmark."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"machine: {cpu}, nproc={os.cpu_count()}, torch {torch.__version__}, "
            f"torch threads={torch.get_num_threads()}, python {platform.python_version()}, "
            f"load average at start {load}, no GPU")


class Samples:
    """Per-round timings of interleaved candidates: ``cpu[name]`` and ``wall[name]``, seconds per call.

    ``cpu`` is the CPU time of this process (``time.process_time``): with one torch thread it is
    the time the forward, the autograd backward and the optimizer actually ran, without the time the
    process sat preempted by other processes of a shared machine — the robust figure on a loaded
    box. ``wall`` is ``time.perf_counter``, reported alongside (with several torch threads, ``wall``
    is the latency and ``cpu`` the summed work of all threads).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.cpu: Dict[str, List[float]] = {n: [] for n in names}
        self.wall: Dict[str, List[float]] = {n: [] for n in names}

    def median(self, name: str, clock: str = "cpu") -> float:
        return statistics.median(getattr(self, clock)[name])

    def ratio(self, num: str, den: str, clock: str = "cpu") -> float:
        """Median over rounds of num / den, both measured in the same round."""
        series = getattr(self, clock)
        return statistics.median([a / b for a, b in zip(series[num], series[den])])


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    inner: int = 1,
) -> Samples:
    """Time every candidate in interleaved rounds, ``inner`` calls per sample, after ``warmup``
    untimed rounds. Rounds are paired, so ratios are taken round by round (:meth:`Samples.ratio`),
    cancelling most of the drift of a shared machine. The order changes every round (all
    permutations in turn for up to 4 candidates, else a seeded shuffle), so no candidate always runs
    first or always right after the same other one (a candidate that allocates a lot slows the next
    one down by ~15% — measured).
    """
    names = list(candidates)
    if len(names) <= 4:
        orders = [list(p) for p in itertools.permutations(names)]
    else:
        rng = random.Random(0)
        orders = []
        for _ in range(repeats):
            order = list(names)
            rng.shuffle(order)
            orders.append(order)
    for _ in range(warmup):
        for name in names:
            for _ in range(inner):
                candidates[name]()
    samples = Samples(names)
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            fn = candidates[name]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            w1, c1 = time.perf_counter(), time.process_time()
            samples.cpu[name].append((c1 - c0) / inner)
            samples.wall[name].append((w1 - w0) / inner)
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler back-end's own log lines (written to fd 2 by C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch CPU allocations made while ``fn()`` runs, above what was live at its start.

    Uses the profiler's allocation events (``profile_memory=True``): every allocation and free of
    the torch CPU allocator, in time order; the peak of their running sum is the high-water mark of
    tensor memory the call added (activations, saved tensors, gradients, temporaries). Memory that
    was live before the call (parameters, inputs) is not counted; tracemalloc cannot see these
    allocations, and maxrss mixes in the interpreter and malloc caching.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node) -> None:
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs the forward."""
    seen = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def load_revision(rev: str, module: str):
    """``crmt_plugin.<module>`` as it was at git revision ``rev`` (read with ``git show``), imported
    under the name ``crmt_plugin._at_<rev>_<module>`` so it runs next to the working-tree version."""
    import importlib.util
    import re
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:crmt_plugin/{module}.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    name = f"crmt_plugin._at_{re.sub(r'[^0-9A-Za-z]', '_', rev)}_{module}"
    path = os.path.join(tempfile.mkdtemp(prefix="crmt_bench_"), f"{module}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # its relative imports (.errors) resolve inside crmt_plugin
    return mod


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f}"


def retraction_head(crmt):
    """Benchmark-only prototype of the alternative to the W~ cache: keep V^(m) itself orthonormal.

    Replaces ``crmt``'s CRMTHead (in place, same parameters) by a subclass whose forward uses
    W~ = V directly for orthonormal modalities (no QR, no QR backward) and returns ``retract``, to be
    called after every optimiser step: V <- orthonormalize_rows(V) under ``no_grad`` (one QR forward
    per modality and step). Not gradient-identical to the library's head: the optimiser sees the
    Euclidean gradient w.r.t. W~ instead of the gradient through the QR (a retraction step on the
    Stiefel manifold), so training follows another trajectory.
    """
    from crmt_plugin.head import CRMTHead, orthonormalize_rows

    class RetractedHead(CRMTHead):
        def _weight(self, name):
            if self.orthonormal_rows[name]:
                return self.directions[name]
            return super()._weight(name)

        def retract(self) -> None:
            with torch.no_grad():
                for name, v in self.directions.items():
                    if self.orthonormal_rows[name]:
                        v.copy_(orthonormalize_rows(v))

    head = crmt.head
    head.__class__ = RetractedHead  # same parameters, same state_dict keys
    head.retract()
    return head.retract
