"""``crmt-benchmark``: train and evaluate the CRMT recipes and their baselines on a multi-modal ``.npz``.

Usage::

    crmt-benchmark --data FILE.npz --methods jt,crmt-jt,pgd-at,crmt-at,trades,crmt-trades,mixup,crmt-mix \\
                   --seeds 0 1 2 --out DIR
    python -m crmt_plugin.benchmark --data FILE.npz --quick --out /tmp/smoke

Writes ``DIR/results.json``, ``DIR/results.md``, ``DIR/robustness.png`` and
``DIR/<method>/seed<k>/model.pt``. Any bad input (file, flags, unwritable DIR) gives one error line,
exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._optional import progress_bar
from ..errors import CRMTError
from ..loss import PENALTIES
from .data import load_npz
from .evaluate import EvalConfig, evaluate, find_radius
from ..selection import DEFAULT_CANDIDATES
from .recipes import DEFAULT_MIN_STEPS, METHODS, TrainConfig, check_methods, train
from .models import ENCODER_FAMILIES
from .select import train_selected
from .report import plot_robustness, write_json, write_markdown

__all__ = ["main", "build_parser", "run"]

DEFAULT_METHODS = "jt,crmt-jt,pgd-at,crmt-at,trades,crmt-trades,mixup,crmt-mix"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="crmt-benchmark", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="the .npz: x_<name> (N, ...) per modality, y (N,), optional split")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--out", default="benchmark-out", help="output folder DIR")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the stratified 60/20/20 split (no split array)")
    p.add_argument("--radius", default="auto",
                   help="l2 radius of every attack (file's input units), or 'auto': where JT's joint PGD "
                        "accuracy on the validation split is closest to 45%%")
    p.add_argument("--epochs", type=int, default=30, help="the least number of step-1 epochs of every method")
    p.add_argument("--min-steps", type=int, default=DEFAULT_MIN_STEPS,
                   help="the least number of step-1 optimiser steps: small data sets train more epochs "
                        "(recipes.training_schedule); 0 trains exactly --epochs")
    p.add_argument("--max-epochs", type=int, default=1000, help="the most step-1 epochs the step budget may ask for")
    p.add_argument("--batch-size", type=int, default=None,
                   help="step-1 batch size (default: min(64, max(8, 2**floor(log2(N_train / 8)))))")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--train-steps", type=int, default=3, help="PGD steps of the training attack (AT, TRADES)")
    p.add_argument("--train-eps", type=float, default=None,
                   help="l2 budget of the training attack (default: the evaluation radius)")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES: weight of the KL term")
    p.add_argument("--alpha", type=float, default=1.0, help="Mixup: lambda ~ Beta(alpha, alpha)")
    p.add_argument("--rho", type=float, default=None, help="crmt_loss rho (default: the library's default)")
    p.add_argument("--temperature", type=float, default=None,
                   help="crmt_loss temperature (default: the library's default)")
    p.add_argument("--margin", default=None, choices=("relative", "raw"),
                   help="crmt_loss margin: 'raw' is the paper's formula (default: the library's default)")
    p.add_argument("--penalty", default=None, choices=PENALTIES,
                   help="crmt_loss penalty (default: the library's default)")
    p.add_argument("--margin-target", type=float, default=None,
                   help="crmt_loss margin_target of the hinge (default: the library's default)")
    p.add_argument("--integration-init", default=None,
                   help="initial a of every CRMT head but the paper recipe's: a number > 0, or 'fit' (the "
                        "CRMTWrapper default) (default: 0.1 for crmt-jt and crmt-mix, 'fit' for crmt-at and "
                        "crmt-trades)")
    p.add_argument("--encoder", default="bn", choices=ENCODER_FAMILIES,
                   help="encoder family: bn (BatchNorm + ReLU), ln (LayerNorm + GELU + dropout), frozen (a "
                        "pretrained BatchNorm encoder per modality, frozen, with a trainable projection)")
    p.add_argument("--select", dest="select", action="store_const", const=True, default=None,
                   help="choose the rho of crmt-jt, crmt-at, crmt-trades and crmt-mix on the validation split among "
                        "--select-candidates and the recipe's baseline (jt, pgd-at, trades, mixup): the most robust "
                        "of them within half a point of the baseline's clean validation accuracy, the baseline itself "
                        "when CRMT does not help (rho null in results.json); the default unless --rho is given")
    p.add_argument("--no-select", dest="select", action="store_const", const=False,
                   help="train every CRMT recipe once with --rho (or the library's default rho)")
    p.add_argument("--select-candidates", type=float, nargs="+", default=list(DEFAULT_CANDIDATES),
                   help="the rho values --select tries")
    p.add_argument("--no-select-baseline", dest="select_baseline", action="store_false",
                   help="--select without the baseline: the tolerance measured from rho = 0, never falling back "
                        "to the baseline (the rule before 2026-12-04)")
    p.add_argument("--missing-fill-weight", type=float, default=1.0,
                   help="weight of CRMTWrapper.missing_fill_loss (a train-mean-filled modality carries no class "
                        "evidence) in crmt-jt/-at/-trades/-mix; 0 turns it off")
    p.add_argument("--integration-epochs", type=int, default=None,
                   help="step-2 epochs (default: the library's default)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="steps of the strong attack's first stage (default: strong_attack's preset)")
    p.add_argument("--restarts", type=int, default=None,
                   help="restarts of the strong attack's untargeted DLR run (default: strong_attack's preset, none)")
    p.add_argument("--queries", type=int, default=1000, help="queries of the gradient-free attack")
    p.add_argument("--max-test", type=int, default=None, help="attack only the first N test samples")
    p.add_argument("--no-sound", action="store_true", help="skip the sound certificates")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the independent (method, seed) jobs in N parallel processes, one torch thread each "
                        "(the same results as --jobs 1 --threads 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 epochs, weak attacks, 64 test samples (numbers meaningless)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_out(out: str) -> None:
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CRMTError(f"--out {out}: exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CRMTError(f"--out {out}: cannot create it, {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CRMTError(f"--out {out}: {probe} is not writable")


def _integration_init(value: Optional[str]):
    if value is None or value == "fit":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise CRMTError(f"--integration-init must be 'fit' or a finite number > 0, found {value!r}")
    return number


def _configs(args: argparse.Namespace):
    for name in ("epochs", "max_epochs", "batch_size", "train_steps", "eval_steps", "restarts", "queries", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CRMTError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.select is None:
        args.select = args.rho is None
    if args.select:
        c = args.select_candidates
        if not c or len(set(c)) != len(c) or any(not (0 <= v < float("inf")) for v in c):
            raise CRMTError(f"--select-candidates must be distinct finite numbers >= 0, found {c}")
    if args.min_steps < 0:
        raise CRMTError(f"--min-steps must be >= 0, found {args.min_steps}")
    if args.max_test is not None and args.max_test < 1:
        raise CRMTError(f"--max-test must be >= 1, found {args.max_test}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise CRMTError(f"--seeds must be distinct integers >= 0, found {args.seeds}")
    if args.radius == "auto":
        radius = None
    else:
        try:
            radius = float(args.radius)
        except ValueError:
            raise CRMTError(f"--radius must be 'auto' or a number > 0, found {args.radius!r}") from None
        if not radius > 0 or radius == float("inf"):
            raise CRMTError(f"--radius must be 'auto' or a finite number > 0, found {args.radius!r}")
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, min_steps=args.min_steps,
                            max_epochs=args.max_epochs, lr=args.lr, weight_decay=args.weight_decay,
                            train_steps=args.train_steps, beta=args.beta, alpha=args.alpha, rho=args.rho,
                            temperature=args.temperature, margin=args.margin, penalty=args.penalty,
                            margin_target=args.margin_target, integration_init=_integration_init(args.integration_init),
                            integration_epochs=args.integration_epochs, encoder=args.encoder,
                            missing_fill_weight=args.missing_fill_weight)
    eval_cfg = EvalConfig(steps=args.eval_steps, restarts=args.restarts, queries=args.queries, max_test=args.max_test,
                          sound=not args.no_sound)
    if args.quick:
        train_cfg.epochs = min(train_cfg.epochs, 2)
        train_cfg.min_steps = 0
        eval_cfg.steps, eval_cfg.restarts, eval_cfg.queries, eval_cfg.curve_steps = 5, 1, 30, 3
        eval_cfg.curve_fractions = (0.5,)
        eval_cfg.max_test = min(eval_cfg.max_test or 64, 64)
    return radius, train_cfg, eval_cfg


def _one_job(method: str, seed: int, spec: Dict[str, Any], data: Any = None, trained: Any = None,
             epoch_bar: Any = None, baseline: Any = True) -> Dict[str, Any]:
    """Train (unless ``trained`` is given) and evaluate one (method, seed) job, write its model.pt and
    return its row. Without ``data`` it runs in a worker process: one torch thread, the data read from
    ``spec["data"]``. ``baseline``: the selection's baseline, already trained (or True: train it)."""
    if data is None:
        torch.set_num_threads(1)
        data = load_npz(spec["data"], data_seed=spec["data_seed"])
    device = torch.device(spec["device"])
    if trained is None:
        trained = (train_selected(method, data, spec["train_cfg"], seed, spec["radius"], candidates=spec["candidates"],
                                  baseline=baseline if spec["select_baseline"] else False, device=device,
                                  epoch_bar=epoch_bar) if spec["select"] else
                   train(method, data, spec["train_cfg"], seed, device=device, epoch_bar=epoch_bar))
    folder = os.path.join(spec["out"], method, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    torch.save(copy.deepcopy(trained.model).cpu(), os.path.join(folder, "model.pt"))
    row = evaluate(trained, data, spec["radius"], spec["eval_cfg"], seed=seed, device=device)
    row["model"] = os.path.join(method, f"seed{seed}", "model.pt")
    return row


def run(args: argparse.Namespace, command: str = "", log=print) -> Dict[str, Any]:
    """Validate everything, then train, evaluate and write DIR; returns the results dict."""
    started = time.time()
    methods = check_methods(args.methods.split(","))
    radius, train_cfg, eval_cfg = _configs(args)
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as exc:
        raise CRMTError(f"--device {args.device!r}: {exc}") from None
    data = load_npz(args.data, data_seed=args.data_seed)
    _check_out(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)  # the first write: everything above only reads

    show = not args.no_progress

    def epoch_bar(method: str, seed: int):
        if not show:
            return None
        return lambda r: progress_bar(r, desc=f"{method} seed {seed}", unit="epoch", leave=False)

    jt_models: Dict[int, Any] = {}
    radius_source = "--radius"
    search: List = []
    if radius is None:
        for seed in (progress_bar(args.seeds, desc="JT for --radius auto", unit="run") if show else args.seeds):
            jt_models[seed] = train("jt", data, train_cfg, seed, device=device, epoch_bar=epoch_bar("jt", seed))
        iterations = 2 if args.quick else 6
        radius, search = find_radius([copy.deepcopy(t.model) for t in jt_models.values()], data, eval_cfg,
                                     device=device, iterations=iterations)
        radius_source = "auto: JT's joint accuracy (fast attack, validation split) closest to 45 %"
        log(f"radius auto: r = {radius:g} (" + ", ".join(f"{r:.3g}: {100 * a:.1f}%" for r, a in search) + ")")
    train_cfg.train_eps = args.train_eps if args.train_eps is not None else radius
    jobs = [(m, s) for m in methods for s in args.seeds]
    spec = dict(data=args.data, data_seed=args.data_seed, train_cfg=train_cfg, eval_cfg=eval_cfg, radius=radius,
                select=args.select, candidates=args.select_candidates, select_baseline=args.select_baseline,
                device=str(device), out=args.out)
    workers = max(1, min(int(getattr(args, "jobs", 1) or 1), len(jobs)))
    rows: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    jobs_started = time.time()

    def reusable_baseline(method: str, seed: int) -> Any:
        """The JT of --radius auto, when it is the selection's baseline (same data, config and seed), else True."""
        return jt_models.get(seed, True) if method == "crmt-jt" else True

    def finished(index: int, row: Dict[str, Any]) -> None:
        rows[index] = row
        if sum(r is not None for r in rows) == 1 and len(jobs) > 1:
            took = time.time() - jobs_started
            whole = (jobs_started - started) + took * math.ceil(len(jobs) / workers)
            log(f"first job ({jobs[index][0]} seed {jobs[index][1]}) took {took:.0f} s: the whole run will take "
                f"about {whole / 60:.1f} min ({len(jobs)} jobs, {workers} at a time)")

    if workers == 1:
        for index, (method, seed) in enumerate(progress_bar(jobs, desc="crmt-benchmark", unit="run") if show
                                               else jobs):
            finished(index, _one_job(method, seed, spec, data=data, trained=jt_models.get(seed) if method == "jt"
                                     else None, epoch_bar=epoch_bar(method, seed),
                                     baseline=reusable_baseline(method, seed)))
    else:  # independent jobs in parallel processes, one torch thread each (the same rows as --jobs 1 --threads 1)
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_one_job, method, seed, spec, trained=jt_models.get(seed) if method == "jt"
                                   else None, baseline=reusable_baseline(method, seed)): index
                       for index, (method, seed) in enumerate(jobs)}
            done = concurrent.futures.as_completed(futures)
            for future in (progress_bar(done, total=len(jobs), desc="crmt-benchmark", unit="run") if show else done):
                finished(futures[future], future.result())
    results = {
        "radius": float(radius),
        "modalities": list(data.modalities),
        "classes": int(data.num_classes),
        "rows": rows,
        "data": os.path.abspath(args.data),
        "data_seed": args.data_seed,
        "split_given": data.split_given,
        "split_sizes": data.sizes(),
        "sample_shapes": {n: list(s) for n, s in data.sample_shapes().items()},
        "radius_source": radius_source,
        "radius_search": [[r, a] for r, a in search],
        "masking_margin": eval_cfg.masking_margin,
        "train_config": vars(train_cfg),
        "eval_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(eval_cfg).items()},
        "quick": bool(args.quick),
        "select": list(args.select_candidates) if args.select else None,
        "select_baseline": bool(args.select and args.select_baseline),
        "command": command,
        "seconds": time.time() - started,
        "cpu_seconds": time.process_time(),  # this process's CPU time (all its threads), load-independent
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(os.path.join(args.out, "results.json"), results)
    write_markdown(os.path.join(args.out, "results.md"), results)
    plot_robustness(os.path.join(args.out, "robustness.png"), results)
    log(f"wrote {args.out}/results.json, results.md, robustness.png ({results['seconds']:.0f} s)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        run(args, command="crmt-benchmark " + " ".join(shlex.quote(a) for a in argv))
    except (_UsageError, CRMTError) as exc:
        message = " ".join(str(exc).split())
        print(f"crmt-benchmark: error: {message}", file=sys.stderr)
        return 2
    return 0
