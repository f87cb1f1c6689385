"""Benchmarks: every preset and backend against the dense reference path, side by side in one run.

``nonlocalnet bench`` (:mod:`nonlocalnet.cli`). For each (preset, size, backend) it measures
the median time of forward (or forward+backward) and the peak memory, and prints ratios against the
``dense`` backend measured in the same run. Peak memory is measured, not estimated: on CUDA the
allocator's ``max_memory_allocated``; on CPU the highest sum of live bytes from the profiler's
allocation records (``profile_memory=True``), i.e. the largest live set of intermediates.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass

import matplotlib
import torch

from nonlocalnet.blocks import project
from nonlocalnet.kernels import valid_backends
from nonlocalnet.presets import PRESETS, build_block, resolve_options
from nonlocalnet.profiling import median_time, peak_memory

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

__all__ = ["CORE", "QUICK", "Row", "backends_for", "projection_floor", "run", "run_case"]


def backends_for(name: str, **options) -> list[str]:
    """The backends a preset accepts with these options (``auto`` first, ``dense`` second), from the kernel
    table; ``chunked`` of criss-cross is its ``auto`` path, so it is measured once."""
    o = resolve_options(name, 64, 2, options)
    out = list(valid_backends(o["kernel"], o["normalization"], PRESETS[name].mode))
    return [b for b in out if not (PRESETS[name].mode == "crisscross" and b == "chunked")]


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
    block = build_block(name, c, dim=dim, backend=backend, **options).to(device)
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
    block = build_block(name, c, dim=len(shape) - 2, **(options or {})).to(device).eval()
    x = torch.randn(shape, device=device)
    convs = [m for m in block.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    tokens = {cin: torch.randn(b, n, cin, device=device) for cin in {m.in_channels for m in convs}}
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


def run(*, quick: bool = False, blocks: list[str] | None = None, backends: list[str] | None = None,
        sizes: list[int] | None = None, video: list[tuple[int, int, int]] = (), batch: int | None = None,
        channels: int | None = None, modes: list[str] | None = None, dtypes: list[str] = ("float32",),
        repeats: int | None = None, device: str = "cpu", dense_cap_gib: float = 6.0, floor: bool = False,
        json_path: str | None = None, plot: str | None = None) -> list[Row]:
    """Measure, print the table (stdout) and progress (stderr); optionally write JSON and a log-log plot.

    ``None`` takes the value of :data:`QUICK` (``quick``) or :data:`CORE`; ``blocks`` may hold ``"all"``."""
    cfg = dict(QUICK if quick else CORE)
    blocks = list(PRESETS) if blocks == ["all"] else (blocks or cfg["blocks"])
    sizes = sizes or cfg["sizes"]
    batch, channels = batch or cfg["batch"], channels or cfg["channels"]
    modes, repeats = modes or cfg["modes"], repeats or cfg["repeats"]
    dev = torch.device(device)
    shapes = [(batch, channels, s, s) for s in sizes] + [(batch, channels, *v) for v in video]
    rows: list[Row] = []
    env = environment()
    print(f"# nonlocalnet bench — torch {env['torch']}, {env.get('gpu', env['processor'])}, "
          f"{env['threads']} threads, device {dev}", flush=True)
    for name in blocks:
        opts = {"reduction": 8} if name == "cc" else {}
        chosen = backends or backends_for(name)
        for shape in shapes:
            for mode in modes:
                for dt in dtypes:
                    dtype = getattr(torch, dt)
                    for be in chosen:
                        if be not in backends_for(name):
                            continue
                        try:
                            r = run_case(name, be, shape, mode, dtype, dev, repeats, opts, dense_cap_gib)
                        except (RuntimeError, torch.OutOfMemoryError) as e:  # report, keep going
                            r = Row(name, be, "", "x".join(map(str, shape)), 0, mode, dt, None, None,
                                    note=f"failed: {str(e).splitlines()[0][:80]}")
                        rows.append(r)
                        print(f"  {name} {be:8} {r.shape:16} {mode:8} {dt:8} "
                              f"{(f'{r.time_ms:.2f} ms' if r.time_ms else r.note)}", file=sys.stderr, flush=True)
    add_ratios(rows)
    print(format_table(rows))
    floors = []
    if floor:
        print("\n# physical floor: block forward time / time of its own 1x1 projections")
        for name in blocks:
            opts = {"reduction": 8} if name == "cc" else {}
            f = projection_floor(name, shapes[len(sizes) - 1], dev, repeats, opts)
            floors.append(f)
            print(f"{f['block']:6} {f['path']:10} {f['shape']:16} block {f['block_ms']:9.2f} ms  "
                  f"projections {f['projections_ms']:8.2f} ms  ratio {f['ratio']:5.2f}")
    if plot:
        plot_loglog(rows, plot)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows], "floor": floors}, fh, indent=1)
    return rows
