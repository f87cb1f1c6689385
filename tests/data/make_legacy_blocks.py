"""Write tests/data/legacy_blocks.safetensors with the code of main before kernels, filters and graph modes became
registered parts (commit 4917aaf): `PYTHONPATH=<that checkout>/src python make_legacy_blocks.py OUT`."""
import json
import sys

import torch
from safetensors.torch import save_file

import nonlocalnet

CASES = {"nl": {}, "ns": {"units": 2}, "snl": {}, "gsnl": {}, "cheby": {"order": 3}, "cayley": {},
         "heat": {}, "wavelet": {}, "a2": {}, "cgnl": {"groups": 2}, "cc": {"reduction": 2},
         "gc": {"fusion": "add_mul"}, "dnl": {},
         "nl_sub": {"_name": "nl", "sub_sample": True, "kernel": "concatenation"}}
out, meta = {}, {}
for case, opts in CASES.items():
    opts = dict(opts)
    name = opts.pop("_name", case)
    torch.manual_seed(0)
    block = nonlocalnet.build_block(name, 8, **opts).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    y = block(x)
    for k, v in block.state_dict().items():
        out[f"{case}/state/{k}"] = v.contiguous()
    out[f"{case}/x"], out[f"{case}/y"] = x, y.detach().contiguous()
    meta[case] = {"name": name, "options": opts}
save_file(out, sys.argv[1], metadata={"cases": json.dumps(meta), "written_by": "nonlocalnet 0.1.0 at 4917aaf"})
print(len(out), "tensors")
