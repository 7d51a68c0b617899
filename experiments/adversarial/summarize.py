"""Mean over seeds of every (data, variant) in results/*.jsonl, as a markdown table (percent).

    python experiments/adversarial/summarize.py [results/av.jsonl ...]
"""

import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(paths):
    rows = []
    for p in paths or sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl"))):
        rows += [json.loads(line) for line in open(p) if line.strip()]
    groups = {}
    for r in rows:
        groups.setdefault((r["data"], r["variant"], r.get("epochs"), r.get("loss_md5")), []).append(r)
    for data in sorted({k[0] for k in groups}):
        mods = [k[4:] for k in rows[[r["data"] for r in rows].index(data)] if k.startswith("pgd:")]
        cols = ["clean", "joint"] + [f"pgd:{m}" for m in mods] + [f"missing:{m}" for m in mods] + ["mean_robust"]
        diag = ["train_adv_acc", "train_strong_acc", "train_adv_kl", "logit_std"]
        print(f"\n{data}\n")
        print("| variant | seeds | " + " | ".join(cols + diag) + " |")
        print("|---" * (len(cols) + len(diag) + 2) + "|")
        for (d, v, e, md5), rs in sorted(groups.items(), key=lambda kv: (kv[0][3] or "", kv[0][1])):
            if d != data:
                continue
            cells = []
            for c in cols + diag:
                vals = [r[c] for r in rs if c in r]
                scale = 1 if c in ("train_adv_kl", "logit_std") else 100
                m = statistics.mean(vals) * scale
                cells.append(f"{m:.3f}" if scale == 1 else f"{m:.1f}")
            print(f"| {v} (e{e}, loss {md5}) | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
