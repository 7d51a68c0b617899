"""Mean over seeds of a results .jsonl: clean, robust mean, and the gap to JT.

    python experiments/method/summarize.py experiments/method/results/step1.jsonl [--keys ...]
"""
import argparse
import collections
import json
import statistics

p = argparse.ArgumentParser()
p.add_argument("files", nargs="+")
p.add_argument("--keys", nargs="+", default=["clean", "robust_mean", "pgd_joint", "radius"])
p.add_argument("--baseline", default="jt")
p.add_argument("--group", default="variant")
args = p.parse_args()
rows = [json.loads(line) for f in args.files for line in open(f)]
groups = collections.defaultdict(list)
for r in rows:
    groups[(r["data"], r[args.group])].append(r)
print(f"| data | {args.group} | n | " + " | ".join(args.keys) + " | Δclean vs jt | Δrobust vs jt |")
print("|---|---|--:|" + "--:|" * (len(args.keys) + 2))
for (data, v), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != args.baseline, kv[0][1])):
    def m(k, rs=rs):
        vals = [r[k] for r in rs if k in r]
        return statistics.mean(vals) if vals else float("nan")
    base = groups.get((data, args.baseline), [])
    bc = statistics.mean(r["clean"] for r in base) if base else float("nan")
    br = statistics.mean(r["robust_mean"] for r in base) if base else float("nan")
    cells = " | ".join(f"{m(k):.3f}" for k in args.keys)
    print(f"| {data} | {v} | {len(rs)} | {cells} | {100*(m('clean')-bc):+.1f} | {100*(m('robust_mean')-br):+.1f} |")
