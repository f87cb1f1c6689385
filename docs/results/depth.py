"""Spectra and dynamics of the deep stacks of docs/results.md (Tao et al. 2018, Table 1 at depth): for every finished
run of the given configs under runs/claims10, `nonlocalnet analyze spectrum --no-evolution` and `nonlocalnet analyze
dynamics` (8 test images, 50 iterations; skipped where the run already has them), then one row per run in
docs/results/depth.json: final test top-1, per block the sum of the eigenvalues of sym(W_t W_g) (raw, and with the
output BatchNorm's scale folded in; for an NS stage, of its last unit) and ||x_t|| / ||x_0|| after 1 and 50
iterations of the block on its own input (mean over the images).

Run from the repository root: `python docs/results/depth.py nl_same4 ns_same4 nl_same5 ns_same5`."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "nonlocalnet"]
env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
rows, out = [], []
for config in sys.argv[1:]:
    for seed in range(10):
        run = ROOT / "runs" / "claims10" / config / f"seed{seed}"
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if not lines or json.loads(lines[-1])["epoch"] != 12:
            continue
        final = json.loads(lines[-1])["top1"]
        for what, extra in (("spectrum", ["--no-evolution"]), ("dynamics", [])):
            if not (run / "analysis" / what / f"{what}.json").is_file():
                subprocess.run([*CLI, "analyze", what, str(run), *extra], check=True, env=env,
                               stdout=subprocess.DEVNULL)
        spectrum = json.loads((run / "analysis/spectrum/spectrum.json").read_text())
        dynamics = json.loads((run / "analysis/dynamics/dynamics.json").read_text())
        blocks = []
        for sb, db in zip(spectrum["blocks"], dynamics["blocks"]):
            last = sb["matrices"][-1]
            ratio = db["modes"]["block"]["ratio_mean"]
            blocks.append({"block": sb["block"], "units": sb["units"], "trace": sum(last["eigenvalues"]),
                           "trace_folded": sum(last["folded"]["eigenvalues"]), "ratio_1": ratio[1],
                           "ratio_50": ratio[-1]})
        out.append({"config": config, "seed": seed, "final_top1": final, "blocks": blocks})
        rows.append(f"| {config} | {seed} | {final:.1f} | "
                    + " / ".join(f"{b['trace']:+.2f}" for b in blocks) + " | "
                    + " / ".join(f"{b['trace_folded']:+.3f}" for b in blocks) + " | "
                    + " / ".join(f"{b['ratio_50']:.2f}" for b in blocks) + " |")
json.dump({"definition": __doc__, "runs": out}, open(ROOT / "docs/results/depth.json", "w"), indent=1)
print("\n".join(rows))
