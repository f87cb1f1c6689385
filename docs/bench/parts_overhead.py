"""Forward+backward time of a few presets (ms), 1 thread: run with one src, then the other (docs/bench/)."""
import json
import time

import torch

import nonlocalnet

torch.set_num_threads(1)
out = {}
for name in ["snl", "nl", "a2", "cgnl", "gc", "cc", "cheby"]:
    for s in (16, 32):
        torch.manual_seed(0)
        b = nonlocalnet.build_block(name, 64)
        x = torch.randn(2, 64, s, s, requires_grad=True)
        for _ in range(3):
            b(x).sum().backward()
        ts = []
        for _ in range(7):
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < 0.05:
                b(x).sum().backward()
                n += 1
            ts.append((time.perf_counter() - t) / n)
        ts.sort()
        out[f"{name}@{s}"] = ts[3] * 1e3
print(json.dumps(out))
