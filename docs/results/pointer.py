"""Does a trained graph collapse to a pointer? For each run, the block's dense A on 8 test images (as `nonlocalnet
analyze affinity` computes it): the mean over rows of the largest entry of a row, and how many distinct positions
the rows' argmaxes hit per image (1: every query reads the same position). With `--init`, the same of the config's
freshly initialized model, one per seed of `--init-seeds` (0-4 by default). Run from the repository root after the
sweeps (docs/results.md, the stable hypothesis):

    python docs/results/pointer.py docs/results/pointer.json 'runs/claims10/agent/seed*' \
        --init configs/claims/agent.yaml
"""
import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from nonlocalnet.analysis.capture import capture_blocks, dense_affinity, load_batch
from nonlocalnet.runs.load import load_config_only, load_run
from nonlocalnet.train.trainer import seed_everything


def measure(loaded) -> dict:
    batch = load_batch(loaded.cfg, count=8, split="test", data_root=None, what="pointer.py")
    loaded.model.eval()
    io = capture_blocks(loaded.model, loaded.blocks, batch.x)
    name, block = next(iter(loaded.blocks.items()))
    a = dense_affinity(block, io[name][0])  # (images, N, N')
    targets = a.argmax(-1)
    return {"block": name, "n": int(a.shape[1]), "mean_row_max": float(a.max(-1).mean()),
            "distinct_targets_per_image": float(np.mean([len(np.unique(t)) for t in targets]))}


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("out", type=Path, help="the JSON file to write")
parser.add_argument("globs", nargs="+", help="run directories (glob patterns)")
parser.add_argument("--init", help="a config whose freshly initialized model is measured too")
parser.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="the seeds of those initializations (seed_everything, as `nonlocalnet train`)")
args = parser.parse_args()
torch.set_num_threads(1)
out = {"definition": __doc__.split("\n\n")[0], "runs": {}}
if args.init:
    out["init"] = {args.init: {}}
    for seed in args.init_seeds:
        seed_everything(seed)
        out["init"][args.init][str(seed)] = measure(load_config_only(args.init))
        print(args.init, f"(init, seed {seed})", out["init"][args.init][str(seed)])
for pattern in args.globs:
    for run in sorted(glob.glob(pattern)):
        if not (Path(run) / "last.safetensors").is_file():
            continue
        out["runs"][run] = measure(load_run(run))
        print(run, out["runs"][run])
args.out.write_text(json.dumps(out, indent=1) + "\n")
