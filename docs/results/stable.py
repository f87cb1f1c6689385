"""The stable hypothesis on trained graphs (docs/results.md): ||A^k - A||_F / ||A||_F for k = 2, 3, 4, from
`nonlocalnet analyze affinity RUN` (8 test images per run; the block's dense A on its captured input), per preset,
over the seeds given. Run from the repository root after the analyses:

    python docs/results/stable.py OUT.json LABEL=RUN_DIR_GLOB [LABEL=RUN_DIR_GLOB ...]

e.g. `python docs/results/stable.py docs/results/stable_demo.json nl='runs/F/nl/seed*' snl='runs/F/snl/seed*'`.
Groups already in OUT that are not given again keep their recorded runs (the run directories of an earlier session
need not be on this machine); a group given again is measured again from its glob, and its recorded runs that the
glob does not find keep their recorded values (a group grows over sessions)."""
import glob
import json
import statistics
import sys
from pathlib import Path

out = {"definition": "rel_fro(k) = ||A^k - A||_F / ||A||_F, mean over 8 test images per run (nonlocalnet analyze "
                     "affinity); per preset: each seed's value and their mean", "groups": []}
recorded = {g["label"]: g for g in json.loads(Path(sys.argv[1]).read_text())["groups"]} \
    if Path(sys.argv[1]).is_file() else {}
measured = {}
for arg in sys.argv[2:]:
    label, pattern = arg.split("=", 1)
    per_k = {"2": [], "3": [], "4": []}
    runs = []
    for run in sorted(glob.glob(pattern)):
        f = Path(run) / "analysis" / "affinity" / "affinity.json"
        if not f.is_file():
            continue
        block = json.loads(f.read_text())["blocks"][0]
        if "stats" not in block:  # no N x N position graph (CGNL: positions x channels), the analysis says why
            print(f"{run}: {block.get('note', 'no affinity statistics')}", file=sys.stderr)
            continue
        dist = block["stats"].get("distance") or {}
        if not dist:
            continue
        runs.append(run)
        for k in per_k:
            per_k[k].append(dist[k]["rel_fro"])
    # runs recorded under this label whose directories are not measured now (an earlier session's machine) keep
    # their recorded values, so a group can grow over sessions
    by_run = {run: {k: v[i] for k, v in per_k.items()} for i, run in enumerate(runs)}
    old = recorded.get(label, {"runs": []})
    for i, run in enumerate(old["runs"]):
        by_run.setdefault(run, {k: old["rel_fro"][k][i] for k in per_k})
    if not by_run:
        continue
    runs = sorted(by_run)
    per_k = {k: [by_run[run][k] for run in runs] for k in per_k}
    measured[label] = {"label": label, "runs": runs, "rel_fro": per_k,
                       "mean": {k: statistics.fmean(v) for k, v in per_k.items()}}
rows = []
for label in dict.fromkeys([*recorded, *measured]):
    g = measured.get(label) or recorded[label]
    out["groups"].append(g)
    rows.append(f"| {label} | {len(g['runs'])} | " + " | ".join(
        f"{g['mean'][k]:.3f} ({min(v):.3f}–{max(v):.3f})" for k, v in g["rel_fro"].items()) + " |")
Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
print("| preset | runs | A² | A³ | A⁴ |\n| --- | --- | --- | --- | --- |")
print("\n".join(rows))
