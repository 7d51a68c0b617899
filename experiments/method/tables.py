"""The tables of docs/method.md from the result files (mean of the seeds; Δ in points vs JT / step 1).

    python experiments/method/tables.py
"""
import collections
import json
import pathlib
import statistics

HERE = pathlib.Path(__file__).parent / "results"
DATA = ["mor+fac", "fou+zer", "pix+fac", "av"]
STEP1 = [  # (variant key, description)
    ("jt", "JT (plain cross-entropy, nn.Linear head)"),
    ("head", "CRMT head, rho = 0"),
    ("rel2", "old default: relative, logsumexp, rho 2"),
    ("raw2", "paper: raw margin, logsumexp, rho 2"),
    ("rel0.5", "relative, logsumexp, rho 0.5"),
    ("rel2_warm", "relative, logsumexp, rho 2, warm-up over half the epochs"),
    ("rel2_mmean", "relative, mean over modalities of per-modality logsumexp, rho 2"),
    ("rel2_correct", "only modalities that classify the sample right, rho 2"),
    ("rel2_conf", "weighted by each modality's own p(y), rho 2"),
    ("rel2_fconf", "weighted by the fused model's p(y), rho 2"),
    ("rel2_T3", "relative, temperature 3, rho 2"),
    ("rel2_hinge2", "hinge: relu(LSE - 2), rho 2"),
    ("rel2_hinge4", "hinge: relu(LSE - 4), rho 2"),
    ("rel2_ramp2_4", "ramp: clamp(LSE - 2, 0, 4), rho 2"),
    ("rel2_rampm2_4", "per-modality ramp, summed, rho 2"),
    ("rel1_hinge2", "hinge relu(LSE - 2), rho 1"),
    ("rel0.5_hinge2", "hinge relu(LSE - 2), rho 0.5"),
    ("perr1", "sigmoid (each modality's P(error)), rho 1"),
    ("perr1.5", "sigmoid, rho 1.5"),
    ("perr2", "sigmoid, rho 2"),
    ("perr5", "sigmoid, rho 5"),
    ("lib_hinge0.5", "library hinge, target 1.0, rho 0.5"),
    ("lib_hinge0.25", "library hinge, target 1.0, rho 0.25"),
    ("lib_hinge0.1", "**library hinge, target 1.0, rho 0.1 (the default until 2026-12-02)**"),
]


def load(name):
    path = HERE / name
    return [json.loads(line) for line in path.open()] if path.exists() else []


def cell(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.mean(vals) if vals else None


def step1_table():
    rows = load("step1.jsonl")
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["data"], r["variant"])].append(r)
    head = "| step-1 candidate | " + " | ".join(f"{d} clean (Δ) | {d} robust (Δ)" for d in DATA) + " |"
    lines = [head, "|---|" + "--:|" * (2 * len(DATA))]
    for key, text in STEP1:
        cells = []
        for d in DATA:
            rs, base = groups.get((d, key), []), groups.get((d, "jt"), [])
            if not rs:
                cells += ["", ""]
                continue
            c, r = cell(rs, "clean"), cell(rs, "robust_mean")
            n = f"<sup>{len(rs)}</sup>" if len(rs) != 3 else ""
            if key == "jt":
                cells += [f"{100 * c:.1f}{n}", f"{100 * r:.1f}{n}"]
            else:
                bc, br = cell(base, "clean"), cell(base, "robust_mean")
                cells += [f"{100 * c:.1f} ({100 * (c - bc):+.1f}){n}", f"{100 * r:.1f} ({100 * (r - br):+.1f}){n}"]
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(variants, keys):
    rows = load("step1.jsonl")
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["data"], r["variant"])].append(r)
    lines = ["| data | variant | " + " | ".join(keys) + " |", "|---|---|" + "--:|" * len(keys)]
    for d in DATA:
        for v in variants:
            rs = groups.get((d, v), [])
            if rs:
                vals = [cell(rs, k) for k in keys]
                lines.append(f"| {d} | {v} | " + " | ".join("" if x is None else f"{x:.3f}" for x in vals) + " |")
    return "\n".join(lines)


def step2_table(name="step2.jsonl"):
    rows = load(name)
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["data"], r["config"])].append(r)
    configs = ["step1", "paper", "mean_radius", "balanced", "mix", "mean_radius_noprotect", "balanced_tol0"]
    data = sorted({d for d, _ in groups})
    lines = ["| step 2 | " + " | ".join(f"{d} clean (Δ) | {d} robust (Δ) | {d} radius" for d in data) + " |",
             "|---|" + "--:|" * (3 * len(data))]
    for c in configs:
        cells = []
        for d in data:
            rs, base = groups.get((d, c), []), groups.get((d, "step1"), [])
            if not rs:
                cells += ["", "", ""]
                continue
            n = f"<sup>{len(rs)}</sup>" if len(rs) != 3 else ""
            cl, ro, ra = cell(rs, "clean"), cell(rs, "robust_mean"), cell(rs, "radius")
            bc, br = cell(base, "clean"), cell(base, "robust_mean")
            cells += [f"{100 * cl:.1f} ({100 * (cl - bc):+.1f}){n}", f"{100 * ro:.1f} ({100 * (ro - br):+.1f}){n}",
                      f"{ra:.3f}"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(step1_table())
    print()
    print(detail_table(["jt", "head", "rel2", "rel2_hinge2", "lib_hinge0.1", "perr1"],
                       ["clean", "train_clean", "pgd_joint", "radius"]))
    print()
    print(step2_table())
    print()
    print(step2_table("step2_default.jsonl"))
