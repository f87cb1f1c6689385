"""Does a trained graph collapse to a pointer? For each run, the block's dense A on 8 test images (as
`nonlocalnet analyze affinity` computes it): the mean over rows of the largest entry of a row, and how many distinct
positions the rows' argmaxes hit per image (1: every query reads the same position). With `--init`, the same of the
config's freshly initialized model. Run from the repository root after the sweeps (docs/results.md, the stable
hypothesis):

    python docs/results/pointer.py docs/results/pointer.json 'runs/claims10/agent/seed*' \
        --init configs/claims/agent.yaml
"""
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch

from nonlocalnet.analysis.capture import capture_blocks, dense_affinity, load_batch
from nonlocalnet.runs.load import load_config_only, load_run


def measure(loaded) -> dict:
    batch = load_batch(loaded.cfg, count=8, split="test", data_root=None, what="pointer.py")
    loaded.model.eval()
    io = capture_blocks(loaded.model, loaded.blocks, batch.x)
    name, block = next(iter(loaded.blocks.items()))
    a = dense_affinity(block, io[name][0])  # (images, N, N')
    targets = a.argmax(-1)
    return {"block": name, "n": int(a.shape[1]), "mean_row_max": float(a.max(-1).mean()),
            "distinct_targets_per_image": float(np.mean([len(np.unique(t)) for t in targets]))}


torch.set_num_threads(1)
out_path, args = Path(sys.argv[1]), sys.argv[2:]
init = args[args.index("--init") + 1] if "--init" in args else None
globs = [a for i, a in enumerate(args) if a != "--init" and (i == 0 or args[i - 1] != "--init")]
out = {"definition": __doc__.split("\n\n")[0], "runs": {}}
if init:
    out["init"] = {init: measure(load_config_only(init))}
    print(init, "(init)", out["init"][init])
for pattern in globs:
    for run in sorted(glob.glob(pattern)):
        if not (Path(run) / "last.safetensors").is_file():
            continue
        out["runs"][run] = measure(load_run(run))
        print(run, out["runs"][run])
out_path.write_text(json.dumps(out, indent=1) + "\n")
