"""Benchmarks: every preset and backend against the dense reference path, side by side in one run.

``python -m nonlocalnet.bench`` or ``nonlocalnet bench``. For each (preset, size, backend) it measures
the median time of forward (or forward+backward) and the peak memory, and prints ratios against the
``dense`` backend measured in the same run. Peak memory is measured, not estimated: on CUDA the
allocator's ``max_memory_allocated``; on CPU the highest sum of live bytes from the profiler's
allocation records (``profile_memory=True``), i.e. the largest live set of intermediates.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import nonlocalnet
from nonlocalnet.affinity import EXP_KERNELS, LOWRANK_KERNELS
from nonlocalnet.presets import PRESETS, resolve_options


def backends_for(name: str, **options) -> list[str]:
    """The backends a preset accepts with these options (``auto`` first, ``dense`` second)."""
    o = resolve_options(name, 64, 2, options)
    mode = PRESETS[name].mode
    if mode == "channels":
        return ["auto", "dense", "lowrank"]
    if mode == "crisscross":
        return ["auto", "dense"]
    out = ["auto", "dense", "chunked"]
    if o["kernel"] in LOWRANK_KERNELS:
        out.append("lowrank")
    if o["kernel"] in EXP_KERNELS and o["normalization"] in ("softmax", "row"):
        out.append("sdpa")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was live before (measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@dataclass
class Row:
    block: str
    backend: str
    taken: str
    shape: str
    n: int
    mode: str
    dtype: str
    time_ms: float | None
    peak_mib: float | None
    time_ratio: float | None = None  # dense time / this time  (>1: faster than dense)
    mem_ratio: float | None = None  # dense peak / this peak   (>1: less memory than dense)
    note: str = ""


def run_case(name: str, backend: str, shape: tuple[int, ...], mode: str, dtype: torch.dtype,
             device: torch.device, repeats: int, options: dict, dense_cap_gib: float) -> Row:
    b, c = shape[:2]
    spatial = shape[2:]
    n = 1
    for s in spatial:
        n *= s
    dim = len(spatial)
    shape_s = "x".join(map(str, shape))
    row = Row(name, backend, "", shape_s, n, mode, str(dtype).replace("torch.", ""), None, None)
    dense_bytes = b * n * n * 4 * (3 if mode == "fwd+bwd" else 2)
    if backend == "dense" and dense_bytes > dense_cap_gib * 2**30:
        row.note = f"skipped: dense needs ~{dense_bytes / 2**30:.1f} GiB (> --dense-cap-gib)"
        return row
    torch.manual_seed(0)
    block = nonlocalnet.build_block(name, c, dim=dim, backend=backend, **options).to(device)
    x = torch.randn(shape, device=device)
    autocast = dtype in (torch.bfloat16, torch.float16)
    if mode == "fwd+bwd":
        block.train()
        x.requires_grad_(True)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                y = block(x)
            y.float().sum().backward()
    else:
        block.eval()

        def step():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                block(x)

    with torch.no_grad():
        row.taken = block.build_graph(x).backend
    row.time_ms = 1e3 * median_time(step, device, repeats)
    row.peak_mib = peak_memory(step, device) / 2**20
    return row


def projection_floor(name: str, shape: tuple[int, ...], device: torch.device, repeats: int,
                     options: dict | None = None) -> dict:
    """The physical floor: a block's forward time against the time of its own 1×1 projections alone
    (θ, φ, g, W_t — the GEMMs no formulation avoids), measured side by side on the same tokens."""
    b, c = shape[:2]
    n = 1
    for s in shape[2:]:
        n *= s
    torch.manual_seed(0)
    block = nonlocalnet.build_block(name, c, dim=len(shape) - 2, **(options or {})).to(device).eval()
    x = torch.randn(shape, device=device)
    convs = [m for m in block.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    tokens = {cin: torch.randn(b, n, cin, device=device) for cin in {m.in_channels for m in convs}}
    from nonlocalnet.blocks import project

    def projections():
        for m in convs:
            project(m, tokens[m.in_channels])

    with torch.no_grad():
        t_block = median_time(lambda: block(x), device, repeats)
        t_proj = median_time(projections, device, repeats)
        taken = block.build_graph(x).backend
    return {"block": name, "shape": "x".join(map(str, shape)), "path": taken, "block_ms": 1e3 * t_block,
            "projections_ms": 1e3 * t_proj, "ratio": t_block / t_proj}


def add_ratios(rows: list[Row]) -> None:
    dense = {(r.block, r.shape, r.mode, r.dtype): r for r in rows if r.backend == "dense" and r.time_ms}
    for r in rows:
        d = dense.get((r.block, r.shape, r.mode, r.dtype))
        if d and r.time_ms:
            r.time_ratio = d.time_ms / r.time_ms
            r.mem_ratio = d.peak_mib / r.peak_mib if r.peak_mib else None


def format_table(rows: list[Row]) -> str:
    head = (f"{'block':6} {'backend':8} {'path':10} {'shape':16} {'N':>6} {'mode':8} {'dtype':8} "
            f"{'time ms':>9} {'peak MiB':>9} {'x faster':>8} {'x less mem':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r.block:6} {r.backend:8} {r.taken:10} {r.shape:16} {r.n:6d} {r.mode:8} {r.dtype:8} "
                     f"{f(r.time_ms, '9.2f')} {f(r.peak_mib, '9.1f')} {f(r.time_ratio, '8.2f')} "
                     f"{f(r.mem_ratio, '10.2f')} {r.note}")
    return "\n".join(lines)


def plot_loglog(rows: list[Row], path: str, mode: str = "fwd+bwd") -> None:
    """Time against N on log-log axes, one line per (block, backend); slope 1 = linear, 2 = quadratic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.time_ms and r.mode == mode and r.dtype == "float32" and r.shape.count("x") == 3:
            series.setdefault((r.block, r.backend), []).append((r.n, r.time_ms))
    fig, ax = plt.subplots(figsize=(7, 5))
    for (block, backend), pts in sorted(series.items()):
        pts.sort()
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                  ls="--" if backend in ("dense", "chunked") else "-", label=f"{block} {backend}")
    if series:
        ns = sorted({p[0] for pts in series.values() for p in pts})
        t0 = min(p[1] for pts in series.values() for p in pts)
        ax.loglog(ns, [t0 * n / ns[0] for n in ns], color="gray", lw=0.8, label="slope 1 (linear)")
        ax.loglog(ns, [t0 * (n / ns[0]) ** 2 for n in ns], color="black", lw=0.8, label="slope 2 (quadratic)")
    ax.set(xlabel="N (positions)", ylabel=f"time per {mode} (ms)", title="nonlocal blocks: time vs N")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


QUICK = dict(blocks=["snl", "nl"], sizes=[16, 32], batch=2, channels=64, modes=["fwd+bwd"], repeats=3)
CORE = dict(blocks=["snl", "nl"], sizes=[32, 64, 96], batch=4, channels=128, modes=["fwd+bwd"], repeats=3)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="nonlocalnet bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in well under 2 minutes on CPU")
    p.add_argument("--blocks", nargs="+", default=None, help=f"presets (default: snl nl; any of {list(PRESETS)})")
    p.add_argument("--all-blocks", action="store_true", help="every preset")
    p.add_argument("--backends", nargs="+", default=None, help="backends (default: all a preset supports)")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="square sides H=W (N = side²)")
    p.add_argument("--video", nargs="+", default=[], help="clip sizes TxHxW, e.g. 4x28x28 (3-D blocks)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=None)
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dense-cap-gib", type=float, default=6.0, help="skip dense runs needing more than this")
    p.add_argument("--floor", action="store_true",
                   help="also measure each block's forward time against its own 1x1 projections (at the largest size)")
    p.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    p.add_argument("--plot", default=None, help="write a log-log plot of time vs N (PNG) to this file")
    return p


def run(args: argparse.Namespace) -> list[Row]:
    cfg = dict(QUICK if args.quick else CORE)
    blocks = list(PRESETS) if args.all_blocks else (args.blocks or cfg["blocks"])
    sizes = args.sizes or cfg["sizes"]
    batch, channels = args.batch or cfg["batch"], args.channels or cfg["channels"]
    modes, repeats = args.modes or cfg["modes"], args.repeats or cfg["repeats"]
    device = torch.device(args.device)
    shapes = [(batch, channels, s, s) for s in sizes]
    for v in args.video:
        t, h, w = (int(u) for u in v.lower().split("x"))
        shapes.append((batch, channels, t, h, w))
    rows: list[Row] = []
    env = environment()
    print(f"# nonlocalnet bench — torch {env['torch']}, {env.get('gpu', env['processor'])}, "
          f"{env['threads']} threads, device {device}", flush=True)
    for name in blocks:
        opts = {"reduction": 8} if name == "cc" else {}
        backends = args.backends or backends_for(name)
        for shape in shapes:
            for mode in modes:
                for dt in args.dtype:
                    dtype = getattr(torch, dt)
                    for be in backends:
                        if be not in backends_for(name):
                            continue
                        try:
                            r = run_case(name, be, shape, mode, dtype, device, repeats, opts, args.dense_cap_gib)
                        except (RuntimeError, torch.OutOfMemoryError) as e:  # report, keep going
                            r = Row(name, be, "", "x".join(map(str, shape)), 0, mode, dt, None, None,
                                    note=f"failed: {str(e).splitlines()[0][:80]}")
                        rows.append(r)
                        print(f"  {name} {be:8} {r.shape:16} {mode:8} {dt:8} "
                              f"{(f'{r.time_ms:.2f} ms' if r.time_ms else r.note)}", file=sys.stderr, flush=True)
    add_ratios(rows)
    print(format_table(rows))
    floors = []
    if args.floor:
        print("\n# physical floor: block forward time / time of its own 1x1 projections")
        for name in blocks:
            opts = {"reduction": 8} if name == "cc" else {}
            f = projection_floor(name, shapes[-1] if not args.video else shapes[len(sizes) - 1], device,
                                 repeats, opts)
            floors.append(f)
            print(f"{f['block']:6} {f['path']:10} {f['shape']:16} block {f['block_ms']:9.2f} ms  "
                  f"projections {f['projections_ms']:8.2f} ms  ratio {f['ratio']:5.2f}")
    if args.plot:
        plot_loglog(rows, args.plot)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows], "floor": floors}, fh, indent=1)
    return rows


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
