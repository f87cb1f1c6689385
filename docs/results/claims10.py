"""The 10-seed success table of docs/results.md: seeds 0-2 from docs/results/presets.json (session 3) and seeds 3-9
from runs/claims10 (sessions 5 and 6); a run solves the task when its final test top-1 is >= 90 %.

Run from the repository root after the sweep: `python docs/results/claims10.py snl nl baseline`. Groups already in
docs/results/claims10.json keep their recorded runs (the run directories of an earlier session need not be on
this machine); runs found under runs/claims10 are added, and every group is written back."""
import json
import statistics
import sys
from pathlib import Path

from nonlocalnet.apps.summary import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
old = {g["label"]: g for g in json.load(open(ROOT / "docs/results/presets_new.json"))["groups"]}  # cayley … dnl
old.update({g["label"]: g for g in json.load(open(ROOT / "docs/results/presets.json"))["groups"]})  # the first nine
recorded_path = ROOT / "docs/results/claims10.json"
recorded = {g["label"]: g for g in json.load(open(recorded_path))["groups"]} if recorded_path.is_file() else {}
out = {"definition": "a run solves the task when its final test top-1 (epoch 12) is >= 90 %; 95 % Wilson interval",
       "seeds_0_2": "docs/results/presets.json (session 3 code)",
       "seeds_3_9": "runs/claims10 (baseline, nl, snl: session 5's code; the others: session 6's)",
       "groups": []}
rows = []
labels = list(dict.fromkeys([*recorded, *sys.argv[1:]]))
for label in labels:
    if label in recorded:
        finals = dict(zip(recorded[label]["seeds"], recorded[label]["final_top1"]))
    else:
        finals = dict(zip(old[label]["seeds"], old[label]["final_top1"]))
    for s in range(3, 10):
        try:
            last = open(ROOT / f"runs/claims10/{label}/seed{s}/metrics.jsonl").read().strip().splitlines()[-1]
        except FileNotFoundError:
            continue
        m = json.loads(last)
        if m["epoch"] == 12:
            finals[s] = m["top1"]
    seeds = sorted(finals)
    top = [finals[s] for s in seeds]
    k = sum(t >= 90 for t in top)
    lo, hi = wilson_interval(k, len(top))
    solving = [t for t in top if t >= 90]
    g = {"label": label, "seeds": seeds, "final_top1": top, "solved": k, "runs": len(top), "rate": k / len(top),
         "wilson95": [lo, hi], "mean_top1_solving": statistics.mean(solving) if solving else None}
    out["groups"].append(g)
    rows.append(f"| {label} | {k} / {len(top)} | {100*k/len(top):.0f} % [{100*lo:.0f}, {100*hi:.0f}] | "
                f"{g['mean_top1_solving']:.1f} % | " + ", ".join(f"{t:.1f}" for t in top) + " |")
json.dump(out, open(ROOT / "docs/results/claims10.json", "w"), indent=1)
print("\n".join(rows))
