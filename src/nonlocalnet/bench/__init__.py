"""Benchmarks: every preset and backend against the dense reference path, side by side in one run.

``nonlocalnet bench`` (:mod:`nonlocalnet.cli`). For each (preset, size, backend) it measures
the median time of forward (or forward+backward) and the peak memory, and prints ratios against the
``dense`` backend measured in the same run. Peak memory is measured, not estimated: on CUDA the
allocator's ``max_memory_allocated``; on CPU the highest sum of live bytes from the profiler's
allocation records (``profile_memory=True``), i.e. the largest live set of intermediates.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import matplotlib
import torch

from nonlocalnet.blocks import project
from nonlocalnet.kernels import BACKENDS, valid_backends
from nonlocalnet.models import build_model, insert_blocks
from nonlocalnet.presets import PRESETS, build_block, resolve_options
from nonlocalnet.profiling import median_time, peak_memory

from . import naive

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

__all__ = ["CORE", "QUICK", "NaiveRow", "Row", "backends_for", "bench_device", "check_dense_cap", "format_naive",
           "interleaved_medians", "merge_naive", "projection_floor", "run",
           "run_case", "run_naive", "run_naive_case", "training_throughput"]


def bench_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has; a ValueError naming ``device`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu or cuda[:k], got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {device!r}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device: expected cpu or cuda[:k], got {device!r}")
    return dev


def check_dense_cap(dense_cap_gib: float) -> float:
    """``dense_cap_gib`` (GiB the dense runs may need) as a positive finite number; a ValueError otherwise."""
    if isinstance(dense_cap_gib, bool) or not isinstance(dense_cap_gib, int | float) or \
            not (math.isfinite(dense_cap_gib) and dense_cap_gib > 0):
        raise ValueError(f"dense_cap_gib (--dense-cap-gib) must be a positive number of GiB, got {dense_cap_gib!r}")
    return float(dense_cap_gib)


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
                     options: dict | None = None, compile: bool = False) -> dict:
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
    run_block = torch.compile(block) if compile else block
    def projections():
        for m in convs:
            project(m, tokens[m.in_channels])

    with torch.no_grad():
        t_block, t_proj = interleaved_medians([lambda: run_block(x), projections], repeats, warmup=2)
        taken = block.build_graph(x).backend
    return {"block": name, "shape": "x".join(map(str, shape)), "path": taken, "compiled": compile,
            "block_ms": 1e3 * t_block,
            "projections_ms": 1e3 * t_proj, "ratio": t_block / t_proj}


def add_ratios(rows: list[Row]) -> None:
    dense = {(r.block, r.shape, r.mode, r.dtype): r for r in rows if r.backend == "dense" and r.time_ms}
    for r in rows:
        d = dense.get((r.block, r.shape, r.mode, r.dtype))
        if d and r.time_ms:
            r.time_ratio = d.time_ms / r.time_ms
            r.mem_ratio = d.peak_mib / r.peak_mib if r.peak_mib else None


def _cell(v: float | None, spec: str) -> str:
    """A table cell: ``v`` formatted, or "-" when it was not measured."""
    return format(v, spec) if v is not None else "-"


def format_table(rows: list[Row]) -> str:
    head = (f"{'block':6} {'backend':8} {'path':10} {'shape':16} {'N':>6} {'mode':8} {'dtype':8} "
            f"{'time ms':>9} {'peak MiB':>9} {'x faster':>8} {'x less mem':>10}")
    lines = [head, "-" * len(head)]
    f = _cell
    for r in rows:
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
        compile_floor: bool = False,
        json_path: str | None = None, plot: str | None = None) -> list[Row]:
    """Measure, print the table (stdout) and progress (stderr); optionally write JSON and a log-log plot.

    ``None`` takes the value of :data:`QUICK` (``quick``) or :data:`CORE`; ``blocks`` may hold ``"all"``."""
    cfg = dict(QUICK if quick else CORE)
    unknown = [b for b in backends or () if b not in BACKENDS]
    if unknown:
        raise ValueError(f"backends (--backends): unknown {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(BACKENDS)}")
    check_dense_cap(dense_cap_gib)
    blocks = list(PRESETS) if blocks == ["all"] else (blocks or cfg["blocks"])
    sizes = sizes or cfg["sizes"]
    batch, channels = batch or cfg["batch"], channels or cfg["channels"]
    modes, repeats = modes or cfg["modes"], repeats or cfg["repeats"]
    dev = bench_device(device)
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
            for comp in (False, True) if compile_floor else (False,):
                f = projection_floor(name, shapes[len(sizes) - 1], dev, repeats, opts, compile=comp)
                floors.append(f)
                print(f"{f['block']:6} {f['path']:10} {f['shape']:16} {'compiled' if comp else 'eager':8} block "
                      f"{f['block_ms']:9.2f} ms  projections {f['projections_ms']:8.2f} ms  ratio {f['ratio']:5.2f}")
    if plot:
        plot_loglog(rows, plot)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows], "floor": floors}, fh, indent=1)
    return rows


# --------------------------------------------------------------------------------------- the naive baseline
@dataclass
class NaiveRow:
    case: str
    block: str
    shape: str
    mode: str
    threads: int
    path: str
    naive_ms: float | None
    ours_ms: float | None
    ratio: float | None = None  # naive time / block time  (>1: the block is faster)
    note: str = ""
    ratio_lo: float | None = None  # with --processes K: the lowest and highest of the K processes' ratios
    ratio_hi: float | None = None


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the ``with`` block, restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def timed_step(fn, x: torch.Tensor, mode: str, params=()):
    """One call to time: ``fn(x)`` under ``no_grad`` (``mode="fwd"``), or the forward and backward of
    ``fn(x).sum()`` with the gradients of ``x`` and ``params`` cleared first (``"fwd+bwd"``)."""
    if mode != "fwd+bwd":
        def step():
            with torch.no_grad():
                fn(x)
        return step
    xg, params = x.clone().requires_grad_(True), list(params)

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        fn(xg).sum().backward()
    return step


def interleaved_medians(fns: list, repeats: int, warmup: int = 1, min_sample_s: float = 0.01) -> list[float]:
    """Median seconds per call of each function, the samples interleaved (a, b, a, b, ...; the order alternates
    each repeat) so that the machine's drift hits all of them alike. A sample is ``n`` back-to-back calls, ``n``
    chosen once per function so that a sample lasts at least ``min_sample_s`` (like ``timeit``'s autorange):
    a sub-millisecond call timed alone is mostly timer and scheduler noise."""
    counts = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()  # the calibration call, after the warm-up
        once = time.perf_counter() - t0
        counts.append(max(1, math.ceil(min_sample_s / max(once, 1e-7))) if min_sample_s > 0 else 1)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))
        if r % 2:
            order.reverse()
        for i in order:
            fn, n = fns[i], counts[i]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[i].append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in times]


def _naive_bytes(block, shape: tuple[int, ...], mode: str) -> int:
    """What the naive formulation materializes, about (the ``N × N'`` affinity and its softmax; the concatenation
    kernel's ``(B, 2C_k, N, N')`` tensor)."""
    b, n = shape[0], math.prod(shape[2:])
    e = block.edges
    if e.mode != "positions" or e.kernel in ("double_attention", "unary"):
        return 0
    nk = n // (2 ** min(2, len(shape) - 2)) if e.sub_sample else n
    if getattr(e, "pool_sizes", None) is not None:  # APNB's pyramid: N' = Σ s^d whatever N
        nk = sum(s ** (len(shape) - 2) for s in e.pool_sizes)
    per = 2 * e.theta.out_channels + 2 if e.kernel == "concatenation" else 3
    return b * n * nk * 4 * per * (2 if mode == "fwd+bwd" else 1)


def run_naive_case(case: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int,
                   cap_gib: float = 6.0, channels_last: bool = False) -> NaiveRow:
    """One case of :data:`naive.CASES`: the block and its naive formulation, same weights and input, timed
    interleaved on ``threads`` intra-op threads."""
    name, options = naive.CASES[case]
    b, c = shape[:2]
    shape_s = "x".join(map(str, shape)) + (" cl" if channels_last else "")
    torch.manual_seed(0)
    block = build_block(name, c, dim=len(shape) - 2, **options)
    row = NaiveRow(case, name, shape_s, mode, threads, "", None, None)
    need = _naive_bytes(block, shape, mode)
    if need > cap_gib * 2**30:
        row.note = f"skipped: the naive form needs ~{need / 2**30:.1f} GiB (> --dense-cap-gib)"
        return row
    x = torch.randn(shape)
    if channels_last and len(shape) in (4, 5):
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    params = list(block.parameters())
    with num_threads(threads):
        with torch.no_grad():
            row.path = block.build_graph(x).backend
        block.train(mode == "fwd+bwd")
        steps = [timed_step(lambda t: naive.naive_forward(block, t), x, mode, params),
                 timed_step(block, x, mode, params)]
        t_naive, t_ours = interleaved_medians(steps, repeats)
    row.naive_ms, row.ours_ms, row.ratio = 1e3 * t_naive, 1e3 * t_ours, t_naive / t_ours
    return row


def format_naive(rows: list[NaiveRow]) -> str:
    head = (f"{'case':14} {'path':11} {'shape':16} {'mode':8} {'thr':>3} {'naive ms':>9} {'ours ms':>9} "
            f"{'naive/ours':>10}")
    lines = [head, "-" * len(head)]
    f = _cell
    for r in rows:
        spread = f" [{r.ratio_lo:.2f}-{r.ratio_hi:.2f}]" if r.ratio_lo is not None else ""
        lines.append(f"{r.case:14} {r.path:11} {r.shape:16} {r.mode:8} {r.threads:3d} {f(r.naive_ms, '9.2f')} "
                     f"{f(r.ours_ms, '9.2f')} {f(r.ratio, '10.2f')}{spread} {r.note}")
    return "\n".join(lines)


def merge_naive(runs: list[list[dict]]) -> list[NaiveRow]:
    """One row per cell from the rows of several processes: median times and ratio, and the ratios' range."""
    out = []
    for cells in zip(*runs):
        first = cells[0]
        ok = [c for c in cells if c.get("ratio")]
        row = NaiveRow(**{k: first[k] for k in ("case", "block", "shape", "mode", "threads", "path")},
                       naive_ms=None, ours_ms=None, note=first.get("note", ""))
        if ok:
            row.naive_ms = statistics.median(c["naive_ms"] for c in ok)
            row.ours_ms = statistics.median(c["ours_ms"] for c in ok)
            ratios = [c["ratio"] for c in ok]
            row.ratio, row.ratio_lo, row.ratio_hi = statistics.median(ratios), min(ratios), max(ratios)
            row.note = "" if len(ok) == len(cells) else f"{len(cells) - len(ok)} of {len(cells)} processes failed"
        out.append(row)
    return out


def _naive_in_processes(processes: int, argv: list[str]) -> list[NaiveRow]:
    """Run the same naive table in ``processes`` fresh Python processes, one after another, and merge them.

    Why: on the development VM one process's timings of the same cell came out bimodal — e.g. the naive A² at
    32×32 took 0.67 ms in some processes and 1.54 ms in others, pinned to one core, same seed — a property of
    the process (where its buffers landed), not of the call, so repeats within one process cannot average it
    out."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = f"{tmp}/run{i}.json"
            print(f"# process {i + 1} of {processes}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "nonlocalnet", "bench", "--baseline", "naive", *argv, "--json",
                            path], check=True, stdout=subprocess.DEVNULL)
            with open(path) as fh:
                runs.append(json.load(fh)["rows"])
    return merge_naive(runs)


def run_naive(*, cases: list[str] | None = None, blocks: list[str] | None = None, sizes: list[int] = (32, 64),
              batch: int = 2, channels: int = 64, modes: list[str] = ("fwd", "fwd+bwd"),
              threads: list[int] = (1, 2), repeats: int = 5, dense_cap_gib: float = 6.0, channels_last: bool = False,
              json_path: str | None = None, processes: int = 1) -> list[NaiveRow]:
    """``nonlocalnet bench --baseline naive``: every case of :data:`naive.CASES` (or ``cases``, and with
    ``blocks`` adds every case of those presets) against its naive NCHW formulation, printed as ``naive / ours``
    ratios. ``processes > 1``: the table measured in that many fresh processes, merged (median ratio and its
    range per cell; see :func:`_naive_in_processes`)."""
    check_dense_cap(dense_cap_gib)
    if not cases and not blocks:
        chosen = list(naive.CASES)
    else:
        chosen = [k for k in naive.CASES if k in (cases or []) or naive.CASES[k][0] in (blocks or [])]
    env = environment()
    print(f"# nonlocalnet bench --baseline naive — torch {env['torch']}, {env['processor']}, "
          f"B={batch}, C={channels}, median of {repeats} interleaved"
          + (f", {processes} processes" if processes > 1 else ""), flush=True)
    if processes > 1:
        argv = ["--cases", *chosen, "--sizes", *map(str, sizes), "--batch", str(batch), "--channels", str(channels),
                "--modes", *modes, "--threads", *map(str, threads), "--repeats", str(repeats),
                "--dense-cap-gib", str(dense_cap_gib)] + (["--channels-last"] if channels_last else [])
        rows = _naive_in_processes(processes, argv)
    else:
        rows = [_naive_cell(case, (batch, channels, s, s), mode, thr, repeats, dense_cap_gib, channels_last)
                for case in chosen for s in sizes for mode in modes for thr in threads]
    print(format_naive(rows))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "baseline": "naive", **({"processes": processes} if processes > 1 else {}),
                       "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return rows


def _naive_cell(case: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int, cap_gib: float,
                channels_last: bool) -> NaiveRow:
    """One cell of the naive table, its progress line on stderr; a failure is reported in the row, not raised."""
    try:
        r = run_naive_case(case, shape, mode, threads, repeats, cap_gib, channels_last)
    except (RuntimeError, ValueError) as err:  # report, keep going
        r = NaiveRow(case, naive.CASES[case][0], "x".join(map(str, shape)), mode, threads, "", None,
                     None, note=f"failed: {str(err).splitlines()[0][:80]}")
    print(f"  {case:14} {r.shape:16} {mode:8} {threads}t "
          f"{(f'{r.ratio:.2f}x' if r.ratio else r.note)}", file=sys.stderr, flush=True)
    return r


# --------------------------------------------------------------------------------------- training throughput
class _Naive(torch.nn.Module):
    """A block run by its naive formulation (:func:`naive.naive_forward`), its parameters shared."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return naive.naive_forward(self.block, x)


def training_throughput(blocks: list[str] = ("snl", "nl", "cc"), *, arch: str = "preresnet56", batch: int = 128,
                        size: int = 32, stage: int = 1, steps: int = 3, threads: int = 2,
                        json_path: str | None = None) -> list[dict]:
    """Training images/s of ``arch`` with one block after the last unit of ``stage``: the block's ``auto`` path
    against the same network with the block on its ``dense`` backend and with the block's naive formulation
    (the authors' NCHW code, :mod:`naive`). The three networks share one set of weights and one batch; their SGD
    steps (forward, backward, update) are interleaved; median step time."""
    out = []
    with num_threads(threads):
        for name in blocks:
            opts = {"reduction": 8} if name == "cc" else {}
            nets = {}
            for variant in ("auto", "dense", "naive"):
                torch.manual_seed(0)
                net = build_model(arch, 10)
                backend = "dense" if variant == "dense" else "auto"
                insert_blocks(net, [{"stage": stage, "after_last": True, "block": name,
                                     "options": dict(opts, backend=backend)}])
                if variant == "naive":
                    for mod in list(net.modules()):
                        if hasattr(mod, "nonlocal_block"):
                            mod.nonlocal_block = _Naive(mod.nonlocal_block)
                nets[variant] = net.train()
            x = torch.randn(batch, 3, size, size)
            y = torch.randint(0, 10, (batch,))

            def make(net, x=x, y=y):
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

                def step():
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
                return step
            t_auto, t_dense, t_naive = interleaved_medians([make(nets[v]) for v in ("auto", "dense", "naive")],
                                                           steps)
            row = {"block": name, "arch": arch, "batch": batch, "size": size, "stage": stage, "threads": threads,
                   "auto_img_s": batch / t_auto, "dense_img_s": batch / t_dense, "naive_img_s": batch / t_naive,
                   "auto_vs_dense": t_dense / t_auto, "auto_vs_naive": t_naive / t_auto}
            out.append(row)
            print(f"{name:5} {arch} B={batch} {size}x{size} stage {stage}, {threads} threads: auto "
                  f"{row['auto_img_s']:7.1f} img/s, dense {row['dense_img_s']:7.1f}, naive {row['naive_img_s']:7.1f}"
                  f"  auto/dense {row['auto_vs_dense']:.2f}x  auto/naive {row['auto_vs_naive']:.2f}x", flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": environment(), "throughput": out}, fh, indent=1)
    return out
