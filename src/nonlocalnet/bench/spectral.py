"""Benchmark of the spectral filters: the exact ``r × r`` path against Chebyshev filters of order 2/4/8 and
against the dense eigendecomposition, side by side in one run (docs/benchmarks.md, "Spectral filters").

``nonlocalnet bench --spectral [--sizes 32 64 96] [--batch 1] [--channels 64]``. For each size
``N = s²`` it times (median) and measures the peak memory of, forward only, on one SNL graph
(``relu_dot`` + ``symmetric``, ``C_s = C/2``, rank ``r = 2 C_s``):

- ``graph``: the affinity operator alone (projections, degrees) — common to every row below;
- ``<filter> exact``: the whole block with the exact ``r × r`` path (heat, Cayley, wavelet at their preset
  orders);
- ``cheby K``: the Chebyshev block of order ``K`` (``K`` products with ``A``) on the low-rank graph;
- ``<filter> cheb-approx K``: the same spectral filter through its Chebyshev expansion of order ``K``;
- ``heat dense eigh``: the dense ``A`` (``N × N``), ``torch.linalg.eigh``, ``V f(Λ) Vᵀ Z`` — the textbook
  way; skipped above ``--eigh-max`` nodes;
- ``<filter> r x r algebra``: building the terms' ``(α, M)`` from the core alone (part of ``exact``);
- ``spectrum core`` / ``spectrum dense``: all eigenvalues of ``A`` through the core vs ``eigvalsh`` of the
  dense ``A`` (what ``analyze filter`` needs).

Times: median and minimum over ``--repeats`` calls (the minimum is the robust figure on a shared machine).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import nonlocalnet
from nonlocalnet import spectral as sp
from nonlocalnet import spectral_filters as sf
from nonlocalnet.profiling import peak_memory

from . import environment


def times(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls (CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _cases(block_args: dict, x: torch.Tensor, eigh_max: int):
    c = x.shape[1]
    n = x[0, 0].numel()
    snl = nonlocalnet.build_block("snl", c, **block_args).eval()
    graph = snl.build_graph(x)
    yield "graph", lambda: snl.build_graph(x)
    for name in ("heat", "cayley", "wavelet"):
        b = nonlocalnet.build_block(name, c, **block_args).eval()
        b.edges.load_state_dict(snl.edges.state_dict())
        yield f"{name} exact", lambda b=b: b(x)
    for k in (2, 4, 8):
        b = nonlocalnet.build_block("cheby", c, order=k, **block_args).eval()
        b.edges.load_state_dict(snl.edges.state_dict())
        yield f"cheby {k}", lambda b=b: b(x)
    for k in (8, 16):
        b = nonlocalnet.build_block("heat", c, spectral_path="chebyshev", approx_order=k, **block_args).eval()
        b.edges.load_state_dict(snl.edges.state_dict())
        yield f"heat cheb-approx {k}", lambda b=b: b(x)
    core = sp.core_matrix(graph.u, graph.v)
    for name in ("heat", "cayley", "wavelet"):
        order = sf.DEFAULT_ORDER[name]
        scales = sf.initial_scales(name, order).double()
        yield f"{name} r x r algebra", lambda n=name, o=order, sc=scales: sf.elements(n, o, sc, core)

    def spectrum_core():
        g = snl.build_graph(x)
        return sp.eigenvalues(g.u, g.v, symmetric=True)

    yield "spectrum core", spectrum_core
    if n <= eigh_max:
        heat = nonlocalnet.build_block("heat", c, **block_args).eval()
        heat.edges.load_state_dict(snl.edges.state_dict())
        unit = heat.units[0]
        t = unit.spectral.scales()

        def dense_eigh():
            tok = x.flatten(2).transpose(1, 2)
            a = snl.build_graph(x).dense()
            lam, vec = torch.linalg.eigh(a)
            z = tok @ unit.g.weight.flatten(1).T
            proj = vec.transpose(1, 2) @ z
            terms = [z] + [vec @ (torch.exp(-tj * (1 - lam)).unsqueeze(-1) * proj) for tj in t]
            return sum(term @ w.weight.flatten(1).T for term, w in zip(terms, unit.w))

        yield "heat dense eigh", dense_eigh
        yield "spectrum dense", lambda: torch.linalg.eigvalsh(snl.build_graph(x).dense())


def run_spectral(sizes=(32, 64, 96), batch: int = 1, channels: int = 64, repeats: int = 5, eigh_max: int = 96 * 96,
                 threads: int | None = None, json_path: str | None = None) -> list[dict]:
    """Measure and print one line per (size, case); optionally write the rows and the environment as JSON.
    The dense rows run once above N = 2048 (the eigh at 96² takes minutes on 2 cores); their peak memory is
    not measured above N = 4096 (the profiler's overhead there is larger than the measurement)."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    device = torch.device("cpu")  # peak_memory's device
    env = environment()
    print(f"# spectral filters — torch {env['torch']}, {env['threads']} threads, B={batch}, C={channels}", flush=True)
    for s in sizes:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, s, s)
        with torch.no_grad():
            for label, fn in _cases({}, x, eigh_max):
                reps = 1 if "dense" in label and s * s > 2048 else repeats
                ts = times(fn, reps, warmup=0 if reps == 1 else 1)
                mem = peak_memory(fn, device) if not ("dense" in label and s * s > 4096) else None
                row = {"N": s * s, "side": s, "case": label, "ms": 1e3 * statistics.median(ts),
                       "min_ms": 1e3 * min(ts), "repeats": reps, "peak_mib": None if mem is None else mem / 2**20}
                rows.append(row)
                print(f"N={s}x{s:<3} {label:<22} median {row['ms']:10.1f} ms  min {row['min_ms']:10.1f} ms  "
                      f"{'-' if mem is None else f'{mem / 2**20:9.1f}'} MiB", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "batch": batch, "channels": channels, "rows": rows}, f, indent=1)
    return rows


def _fwd_bwd(block, x):
    def step():
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()
    return step


def run_spectral_vs_snl(channels=(256, 512, 1024), sides=(7, 10, 14, 32, 64), batch: int = 2, repeats: int = 3,
                        threads: int | None = None, json_path: str | None = None) -> list[dict]:
    """The spectral presets (Cayley, heat, wavelet at their default orders, default ``spectral_path="auto"``)
    forward + backward against SNL on the same input, per ``C`` (``C_s = C/2``, rank ``r = C``) and side
    (``N = side²``); the exact form each takes (:func:`spectral_filters.exact_form`: ``core`` r×r or ``dense``
    N×N); timed interleaved (SNL, Cayley, heat, wavelet, SNL, …), median of ``repeats`` rounds after one warm-up
    round; ratio = preset / SNL. docs/benchmarks.md, "Spectral filters against SNL"."""
    if threads:
        torch.set_num_threads(threads)
    env = environment()
    print(f"# spectral presets vs SNL, forward+backward — torch {env['torch']}, {env['threads']} threads, B={batch}",
          flush=True)
    rows = []
    names = ("snl",) + sf.SPECTRAL_FILTERS
    for c in channels:
        for s in sides:
            torch.manual_seed(0)
            x = torch.randn(batch, c, s, s, requires_grad=True)
            blocks = {n: nonlocalnet.build_block(n, c) for n in names}
            steps = {n: _fwd_bwd(b, x) for n, b in blocks.items()}
            ts = {n: [] for n in names}
            for rnd in range(repeats + 1):
                for n in names:
                    t0 = time.perf_counter()
                    steps[n]()
                    if rnd:
                        ts[n].append(time.perf_counter() - t0)
            snl = statistics.median(ts["snl"])
            line = [f"C={c:<5} N={s}x{s:<3} snl {1e3 * snl:9.1f} ms"]
            for n in names:
                med = statistics.median(ts[n])
                form = None if n == "snl" else sf.exact_form(n, sf.DEFAULT_ORDER[n], s * s, c, c // 2, True)
                rows.append({"C": c, "N": s * s, "side": s, "case": n, "form": form, "ms": 1e3 * med,
                             "min_ms": 1e3 * min(ts[n]), "vs_snl": med / snl, "repeats": repeats})
                if n != "snl":
                    line.append(f"{n} {1e3 * med:9.1f} ms {med / snl:5.2f}x ({form})")
            print(" | ".join(line), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "batch": batch, "rows": rows}, f, indent=1)
    return rows
