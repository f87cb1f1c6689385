"""Error, time and peak memory of the softmax approximations (``approx="performer"`` / ``"nystrom"``) against the
exact softmax graph (docs/approximations.md).

``nonlocalnet bench --approx [--sizes 16 32 64 128] [--video 4x32x32] [--features 16 32 64 128 256]
[--logit-scales 1 3] [--channels 64] [--batch 1] [--repeats 3] [--threads 1]``.

For every input size (2-D sides ``s``, ``N = s²``; 3-D clips ``T×H×W``) and every logit scale ``σ`` it builds one
``nl`` block (embedded Gaussian, softmax, ``C_s = C_v = C/2``) on **trained-like inputs**: features ``X`` that are
spatially smooth (white noise blurred by a Gaussian of width ``side/8``, plus 20 % white noise, each channel
standardized as after a BatchNorm, then rectified: the post-ReLU output of a residual stage), the block's own
random projections ``θ, φ, g`` (PyTorch's default init) and
the logit scale ``s`` set so that the logits ``s θ_i·φ_j`` have standard deviation ``σ`` over all pairs (measured on
256 sampled rows). The output BatchNorm is in eval mode with scale 1, so the nonlocal branch is not zero. The exact
block runs on the ``sdpa`` backend; the approximate blocks share its weights (and, for Performer, draw their own
random features; ``--draws`` draws, errors averaged). Reported per row:

- ``err_az``: ``‖Ã Z − A Z‖_F / ‖A Z‖_F`` with ``Z = g(X)``, the graph's product alone;
- ``err_out``: ``‖Ỹ − Y‖_F / ‖Y − X‖_F``, the block output's error relative to its nonlocal branch (the residual
  ``X`` left out of the denominator: with it every error would look small);
- ``ms``: median forward time (``--repeats`` calls after one warm-up, the methods interleaved; ``vs_exact`` its
  ratio to the exact block's, ``vs_exact_min`` the ratio of the minima, the robust figure on a shared machine),
  ``peak_mib``: the
  peak memory of one forward (:func:`nonlocalnet.profiling.peak_memory`), both under ``torch.no_grad``;
- ``perplexity``: ``exp`` of the mean row entropy of the exact ``A`` (the number of keys a query effectively
  attends to; for the inputs' realism), from 256 sampled rows; ``s_q2``, ``s_k2``: the mean ``s‖θ_i‖²``,
  ``s‖φ_j‖²`` (the variance of Performer's estimate grows as ``exp`` of these).

Above ``--big-n`` positions only the features ``--big-features`` are run (the time budget of a shared machine).
A summary at the end gives, per size and logit scale, the smallest ``m`` of each approximation whose output error
is at most 1 %, 5 % and 25 % and its time against the exact block.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nonlocalnet.presets import build_block
from nonlocalnet.profiling import peak_memory

from . import environment

METHODS = ("performer", "nystrom")


def smooth_features(batch: int, channels: int, spatial: tuple[int, ...], generator: torch.Generator,
                    noise: float = 0.2) -> torch.Tensor:
    """Spatially correlated post-ReLU features ``(B, C, *S)``: white noise blurred by a separable Gaussian of
    width ``min(S)/8`` along every axis, plus ``noise`` white noise, each channel standardized over the positions
    and rectified (mean ≈ 0.4, std ≈ 0.58)."""
    x = torch.randn(batch, channels, *spatial, generator=generator)
    width = max(1.0, min(spatial) / 8)
    for axis in range(len(spatial)):
        radius = min(int(3 * width), spatial[axis])  # circular: at most one wrap
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / width) ** 2)
        taps = taps / taps.sum()
        moved = x.movedim(2 + axis, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="circular")
        x = F.conv1d(flat, taps.view(1, 1, -1)).reshape(shape).movedim(-1, 2 + axis)
    x = x / x.flatten(2).std(-1).view(batch, channels, *([1] * len(spatial)))
    x = x + noise * torch.randn(x.shape, generator=generator)
    flat = x.flatten(2)
    # standardized, then rectified: a residual stage's output, where the papers insert the block, is post-ReLU
    return torch.relu((flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True)).reshape(x.shape)


def _logits_sample(block, x: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Unscaled logits ``θ_i·φ_j`` of ``rows`` sampled queries against every key ``(B, rows, N)``."""
    tok = x.flatten(2).transpose(1, 2)
    q, k = block.edges.queries_keys(tok, tuple(x.shape[2:]))
    idx = torch.randperm(q.shape[1], generator=generator)[:rows]
    return q[:, idx] @ k.transpose(1, 2)


def _block(c: int, dim: int, scale: float, **options):
    b = build_block("nl", c, dim=dim, scale=scale, **options).eval()
    return b


def _times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Each call of ``fns`` timed ``repeats`` times after one warm-up round, interleaved."""
    out = {k: [] for k in fns}
    for rnd in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd:
                out[k].append(time.perf_counter() - t0)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_approx(sides=(16, 32, 64, 128), video=((4, 32, 32),), features=(16, 32, 64, 128, 256),
               logit_scales=(1.0, 3.0), channels: int = 64, batch: int = 1, repeats: int = 3, draws: int = 3,
               big_n: int = 8192, big_features=(64, 256), targets=(0.01, 0.05, 0.25), threads: int | None = 1,
               json_path: str | None = None) -> list[dict]:
    """Measure and print one line per (size, logit scale, method, m); optionally write rows, summary and
    environment as JSON (docs/approximations.md)."""
    if threads:
        torch.set_num_threads(threads)
    env = environment()
    print(f"# softmax approximations vs exact (sdpa) — torch {env['torch']}, {env['threads']} thread(s), B={batch}, "
          f"C={channels}, C_s=C_v={channels // 2}", flush=True)
    device = torch.device("cpu")
    rows: list[dict] = []
    shapes = [(s, s) for s in sides] + [tuple(v) for v in video]
    for spatial in shapes:
        n = math.prod(spatial)
        dim = len(spatial)
        ms = [m for m in features if m <= n and (n <= big_n or m in big_features)]
        gen = torch.Generator().manual_seed(0)
        x = smooth_features(batch, channels, spatial, gen)
        torch.manual_seed(0)
        exact = _block(channels, dim, 1.0, backend="sdpa")
        with torch.no_grad():
            exact.units[0].norm.bn.weight.fill_(1.0)
            raw = _logits_sample(exact, x, 256, gen)
        state = exact.state_dict()
        blocks: dict[tuple[str, int, int], torch.nn.Module] = {}
        timed = {}
        for sigma in logit_scales:
            scale = sigma / float(raw.std())
            exact.edges.scale_value = scale
            with torch.no_grad():
                logits = raw * scale
                p = torch.softmax(logits, -1)
                perplexity = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean())
                tok = x.flatten(2).transpose(1, 2)
                q, k = exact.edges.queries_keys(tok, spatial)
                norms = (scale * (q * q).sum(-1).mean().item(), scale * (k * k).sum(-1).mean().item())
                graph = exact.build_graph(x)
                z = exact.units[0].values(x.flatten(2).transpose(1, 2))
                az = graph.matmul(z)
                y = exact(x)
            branch = (y - x).norm()
            for method in METHODS:
                for m in ms:
                    errs_az, errs_out = [], []
                    for draw in range(draws if method == "performer" else 1):
                        torch.manual_seed(1000 + draw)
                        b = _block(channels, dim, scale, approx=method, approx_features=m)
                        b.load_state_dict(state, strict=False)  # the exact block's weights; its own features
                        with torch.no_grad():
                            ga = b.build_graph(x)
                            errs_az.append(_rel(ga.matmul(z), az))
                            errs_out.append(float((b(x) - y).norm() / branch))
                        blocks[(method, m, draw)] = b
                    rows.append({"N": n, "shape": list(spatial), "sigma": sigma, "perplexity": perplexity,
                                 "s_q2": norms[0], "s_k2": norms[1],
                                 "method": method, "m": m, "err_az": statistics.mean(errs_az),
                                 "err_az_max": max(errs_az), "err_out": statistics.mean(errs_out),
                                 "err_out_max": max(errs_out), "draws": len(errs_az)})
                    print(f"N={n:<6} {'x'.join(map(str, spatial)):<9} σ={sigma:<4g} perplexity {perplexity:8.1f}  "
                          f"s|q|² {norms[0]:5.1f} s|k|² {norms[1]:5.1f}  "
                          f"{method:<9} m={m:<4} err(AZ) {rows[-1]['err_az']:.2e}  err(out) "
                          f"{rows[-1]['err_out']:.2e}", flush=True)
        # time and memory do not depend on the logit scale: once per size, on the last scale's blocks
        timed["exact"] = exact
        for (method, m, draw), b in blocks.items():
            if draw == 0:
                timed[f"{method} {m}"] = b
        with torch.no_grad():
            fns = {k: (lambda b=b, x=x: b(x)) for k, b in timed.items()}
            ts = _times(fns, repeats)
            mem = {k: peak_memory(fn, device) for k, fn in fns.items()}
        t_exact = statistics.median(ts["exact"])
        for k in fns:
            med = statistics.median(ts[k])
            row = {"N": n, "shape": list(spatial), "case": k, "ms": 1e3 * med, "min_ms": 1e3 * min(ts[k]),
                   "vs_exact": med / t_exact, "vs_exact_min": min(ts[k]) / min(ts["exact"]),
                   "peak_mib": mem[k] / 2**20, "repeats": repeats}
            rows.append(row)
            print(f"N={n:<6} {'x'.join(map(str, spatial)):<9} {k:<14} median {row['ms']:9.2f} ms  min "
                  f"{row['min_ms']:9.2f} ms  {row['vs_exact']:6.3f}x exact (min {row['vs_exact_min']:6.3f}x)  peak "
                  f"{row['peak_mib']:8.2f} MiB", flush=True)
    summary = []
    for target in targets:
        part = summarize(rows, target)
        summary += part
        print(f"# smallest m with output error <= {target:g} and its time against exact", flush=True)
        for s in part:
            cell = "-" if s["m"] is None else (f"m={s['m']} err {s['err_out']:.2e} {s['vs_exact']:.3f}x exact "
                                               f"(min times: {s['vs_exact_min']:.3f}x)")
            print(f"N={s['N']:<6} {'x'.join(map(str, s['shape'])):<9} σ={s['sigma']:<4g} {s['method']:<9} {cell}",
                  flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "batch": batch, "channels": channels, "targets": list(targets),
                       "rows": rows, "summary": summary}, f, indent=1)
    return rows


def summarize(rows: list[dict], target: float = 0.01) -> list[dict]:
    """Per (size, logit scale, method): the smallest ``m`` whose mean output error is ``<= target``, with its time
    ratio against the exact block (``m`` ``None`` where no measured ``m`` reaches it)."""
    errs = [r for r in rows if "method" in r]
    times = {(tuple(r["shape"]), r["case"]): r for r in rows if "case" in r}
    out = []
    keys = sorted({(tuple(r["shape"]), r["N"], r["sigma"], r["method"]) for r in errs},
                  key=lambda t: (len(t[0]), t[1], t[2], t[3]))
    for shape, n, sigma, method in keys:
        ok = sorted((r for r in errs if tuple(r["shape"]) == shape and r["sigma"] == sigma and
                     r["method"] == method and r["err_out"] <= target), key=lambda r: r["m"])
        best = ok[0] if ok else None
        t = times.get((shape, f"{method} {best['m']}")) if best else None
        out.append({"target": target, "N": n, "shape": list(shape), "sigma": sigma, "method": method,
                    "m": None if best is None else best["m"], "err_out": None if best is None else best["err_out"],
                    "vs_exact": None if t is None else t["vs_exact"],
                    "vs_exact_min": None if t is None else t["vs_exact_min"]})
    return out
