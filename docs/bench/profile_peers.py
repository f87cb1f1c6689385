"""Where the time goes in the peer cells under 1.2x (docs/benchmarks.md, issue 20): torch.profiler over 10 steps
of the peer and of our converted block, 1 thread, float32, B = 2, C = 64; the ops by self CPU time, and how many
operator calls a step makes. Run in the interop environment, pinned:

    taskset -c 1 env PYTHONPATH=src .venv-vision/bin/python docs/bench/profile_peers.py \
        > docs/bench/profile_peers_cpu.txt
"""
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from nonlocalnet.bench import peers, timed_step

torch.set_num_threads(1)
CELLS = [("cc/mmcv", 32, "fwd+bwd"), ("cc/mmcv", 64, "fwd+bwd"), ("cc-r2/mmcv", 32, "fwd"),
         ("cc-r2/mmcv", 32, "fwd+bwd"), ("nl/mmcv", 32, "fwd+bwd"), ("nl-gauss/mmcv", 32, "fwd+bwd"),
         ("gc/mmcv", 32, "fwd")]
if len(sys.argv) > 1:
    CELLS = [c for c in CELLS if c[0] in sys.argv[1:]]
STEPS = 10
for name, side, mode in CELLS:
    peer, ours = peers.build_pair(name, 64)
    peer, ours = peer.float(), ours.float()
    apply = peers.PEERS[name].apply
    x = torch.randn(2, 64, side, side, generator=torch.Generator().manual_seed(2))
    peer.train(mode == "fwd+bwd"), ours.train(mode == "fwd+bwd")
    def peer_fn(t, apply=apply, peer=peer):
        return apply(peer, t)
    for who, fn, params in (("peer", peer_fn, peer.parameters()), ("ours", ours, ours.parameters())):
        step = timed_step(fn, x, mode, params)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(STEPS):
                step()
        events = [e for e in prof.key_averages()]
        total = sum(e.self_cpu_time_total for e in events) / STEPS / 1e3
        calls = sum(e.count for e in events) / STEPS
        kinds = collections.Counter()
        for e in events:
            kinds[e.key] += e.count / STEPS
        print(f"\n=== {name} {side}x{side} {mode} — {who}: {total:.2f} ms self CPU per step (profiled), "
              f"{calls:.0f} operator calls per step; bmm {kinds['aten::bmm']:.0f}, mm {kinds['aten::mm']:.0f}, "
              f"addmm {kinds['aten::addmm']:.0f}, baddbmm {kinds['aten::baddbmm']:.0f}, convolution "
              f"{kinds['aten::convolution']:.0f}, copy_ {kinds['aten::copy_']:.0f}")
        rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        print(f"{'op':52} {'calls/step':>10} {'self ms/step':>12} {'share':>6}")
        for e in rows:
            ms = e.self_cpu_time_total / STEPS / 1e3
            print(f"{e.key[:52]:52} {e.count / STEPS:10.1f} {ms:12.3f} {100 * ms / total:5.1f}%")
