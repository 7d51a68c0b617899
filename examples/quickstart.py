"""Quickstart: joint training (JT) vs CRMT-JT on real audio-visual digits, robustness table and plot.

    python examples/quickstart.py                 # about 2-3 min on 2 idle CPU cores (mostly evaluation)
    python examples/quickstart.py --max-test 0    # evaluate on the whole test split (600 pairs), twice as long
    python examples/quickstart.py --epochs 4      # faster, a little less accurate

Trains the same late-fusion network (spoken digit MFCCs + handwritten digit image) twice, with the
training loops of ``examples/jt.py`` and ``examples/crmt_jt.py`` (model selection on the validation
split), then evaluates both on the test split exactly as ``crmt-benchmark`` does
(:func:`crmt_plugin.benchmark.evaluate.evaluate`), at one l2 radius (``--radius``, default 2), on the
first 300 test pairs like the benchmark matrix's AV digits (``--max-test``; a more robust model costs
the adaptive attacks more queries, so the evaluation time grows with the robustness it finds):

* clean accuracy; the library's strong attack (APGD with cross-entropy, DLR and targeted runs) on
  both modalities jointly and on each modality alone; a gradient-free attack (Square) on the joint
  budget; per sample the worst of all of them;
* each modality missing (replaced by the training mean);
* certified accuracy: fraction of test samples whose certified l2 radius is >= r (empirical
  Lipschitz constants: an estimate; and sound encoder bounds where available).

Radii are l2 norms in normalised input units. Prints the table and writes
``<out>/quickstart.png`` (accuracy vs radius) plus each model's checkpoint and metrics.json.
"""

import argparse
import os
import time

import common
import crmt_jt
import jt
from crmt_plugin.benchmark.report import plot_robustness


# One line per row of the printed table (the keys of crmt-benchmark's results.json, docs/examples.md).
ROWS = {
    "clean": "accuracy on the unperturbed test pairs",
    "pgd_joint": "under the strong gradient attack (APGD: CE, DLR, targeted runs) on both modalities at once, "
                 "one l2 budget r",
    "worst_joint": "per pair the worst of every joint attack (gradient and gradient-free): the lowest we find, "
                   "still an upper bound on the true robust accuracy",
    "pgd:": "under the strong attack on this modality alone (the other one untouched), budget r",
    "missing:": "with this modality missing (replaced by its training mean)",
    "gradient_free": "under Square, a query-only attack on the joint budget (catches masked gradients)",
    "certified_empirical": "certified radius >= r with Lipschitz constants estimated from gradients on the "
                           "training data: an estimate (the true constant can be larger), not a proof",
    "certified_sound": "certified radius >= r with proven upper bounds of the encoders' Lipschitz constants: a "
                       "guarantee, but bounds composed layer by layer are loose, so it is usually much lower",
    "mean_robust": "the mean of worst_joint, pgd:<m> and missing:<m>: the single robustness summary",
}


def explain(summary_keys):
    """The ROWS lines for the rows present in the table, in its order."""
    lines = []
    for key in summary_keys:
        text = ROWS.get(key) or next((t for prefix, t in ROWS.items() if prefix.endswith(":")
                                      and key.startswith(prefix)), None)
        if text:
            lines.append(f"  {key:<20} {text}")
    return "\n".join(lines)


def expected_time(args):
    """A rough wall time from the measured run (2 idle CPU cores, 8 epochs, the cascaded strong attack of
    2026-12-03: 2 min 11 s for 300 test pairs, ~10 s of it training; the evaluation grows with the pairs)."""
    if args.limit:
        return "under a minute (a smoke test on a slice of the data)"
    pairs = args.max_test or 600
    seconds = 10 + 0.40 * pairs + 2 * 3 * max(args.epochs - 8, 0)
    return f"about {max(1, round(seconds / 60))} min on 2 CPU cores (measured 2 min 11 s for 300 test pairs)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--radius", type=float, default=2.0, help="l2 radius of the attacks and certificates")
    p.add_argument("--out", default=os.path.join("runs", "quickstart"))
    p.add_argument("--limit", type=int, default=None, help="first N samples of each split (smoke tests)")
    p.add_argument("--max-test", type=int, default=300, help="evaluate on the first N test pairs (0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    started = time.time()

    shared = ["--dataset", "av", "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device,
              "--radius", str(args.radius)]
    if args.max_test:
        shared += ["--max-test", str(args.max_test)]
    if args.limit:
        shared += ["--limit", str(args.limit), "--eval-steps", "5", "--eval-restarts", "1", "--queries", "50"]
    shared += ["--quiet"] if args.quiet else ["--no-table"]
    evaluated = f"the first {args.max_test} test pairs" if args.max_test else "the test split"
    print(f"Training JT and CRMT-JT on audio-visual digits (1800 train / 600 validation / 600 test pairs; "
          f"evaluated on {evaluated}); this takes {expected_time(args)}, mostly the attacks.")
    results = {
        "JT": jt.main(shared + ["--out", os.path.join(args.out, "jt")]),
        "CRMT-JT": crmt_jt.main(shared + ["--out", os.path.join(args.out, "crmt_jt")]),
    }

    print(f"\nRobustness on {evaluated} (accuracy %, l2 radius {args.radius:g} in normalised units), "
          f"{time.time() - started:.0f} s in all:\n")
    print(common.format_summary({name: m["summary"] for name, m in results.items()}))
    print("\nRows (certified_empirical and certified_sound differ in the Lipschitz constants behind the radius):")
    print(explain(next(iter(results.values()))["summary"]))
    rows = [dict(m["row"], method=name) for name, m in results.items()]
    path = plot_robustness(os.path.join(args.out, "quickstart.png"),
                           {"radius": args.radius, "modalities": ["audio", "image"], "rows": rows})
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
