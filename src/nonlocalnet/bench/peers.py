"""``nonlocalnet bench --baseline peers``: the public implementations themselves against our blocks.

Each peer is the module a user would install and call — timm's ``NonLocalAttn`` and ``GlobalContext``, mmcv's
``NonLocal2d``, ``ContextBlock`` and ``CrissCrossAttention`` (mmcv-lite from PyPI) — built with its defaults,
its parameters (and BatchNorm running statistics) drawn at random, and mapped into the equivalent nonlocalnet
block by the converter in :mod:`nonlocalnet.compat` (docs/compat.md). Before a pair is timed its outputs are
checked equal in float64 (eval forward, train forward and the input gradient, relative error <= 1e-6); a pair
that disagrees is refused, not timed. Then forward and forward+backward are timed side by side
(:func:`nonlocalnet.bench.interleaved_medians`), and peak memory is measured
(:func:`nonlocalnet.profiling.peak_memory`).

The peer packages are imported lazily, only here (they are the optional extra ``peers``). mmcv-lite ships no
compiled ops, so ``import mmcv.ops`` fails (no ``mmcv._ext``); ``CrissCrossAttention`` is pure PyTorch since mmcv
1.3.13, so its own source file ``mmcv/ops/cc_attention.py`` is loaded from the installed package
(:func:`mmcv_criss_cross_class`): it imports only torch, mmengine's registry and ``mmcv.cnn.Scale``, all present.
mmsegmentation's ``DisentangledNonLocal2d`` (the block of its ``DNLHead``) likewise: mmseg 1.2.2 refuses to import
beside mmcv 2.2.0 (its ``__init__`` asserts ``mmcv < 2.2.0``), so its own file ``models/decode_heads/dnl_head.py``
is loaded from the installed package (:func:`mmseg_dnl_class`), given what it imports: ``mmcv.cnn.NonLocal2d``
(the real one), and, for the ``DNLHead`` class it also defines (not used here), a registry and a placeholder
``FCNHead``.

2-D peers are timed at ``sizes`` (``H = W``), 3-D peers (mmcv's ``NonLocal3d``) at the clips ``video``
(``T × H × W``).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nonlocalnet.compat import from_mmcv, from_mmseg_dnl, from_timm
from nonlocalnet.profiling import peak_memory

from . import _cell, environment, interleaved_medians, num_threads, timed_step

__all__ = ["PEERS", "Peer", "PeerMissingError", "PeerRow", "available_peers", "build_pair", "check_pair",
           "check_shape", "format_peers", "mmcv_criss_cross_class", "mmseg_dnl_class", "run_peer_case", "run_peers"]

RTOL = 1e-6  # float64 agreement asked of a pair before it is timed


class PeerMissingError(RuntimeError):
    """A peer package (timm, mmcv-lite, mmengine) is not installed."""


def _timm_layers():
    from timm import layers  # optional extra `peers` (timm): imported lazily, only by bench --baseline peers
    return layers


def _mmcv_cnn():
    from mmcv import cnn  # optional extra `peers` (mmcv-lite): imported lazily, only by bench --baseline peers
    return cnn


_CC_CLASS: list[type] = []  # the class from mmcv's own cc_attention.py, loaded once per process


def mmcv_criss_cross_class() -> type:
    """mmcv's ``CrissCrossAttention`` class: from ``mmcv.ops`` where it imports (full mmcv, compiled ops), else
    from the installed package's own ``mmcv/ops/cc_attention.py``, loaded as a module of its own (mmcv-lite)."""
    if _CC_CLASS:
        return _CC_CLASS[0]
    _mmcv_cnn()  # what the file imports: mmcv.cnn.Scale (and mmengine's registry, which mmcv.cnn needs too)
    try:
        from mmcv import ops  # optional extra `peers` (full mmcv only): imported lazily, only by this bench
        cls = ops.CrissCrossAttention
    except ImportError:
        spec = importlib.util.find_spec("mmcv")
        path = Path(spec.origin).parent / "ops" / "cc_attention.py"
        if not path.is_file():
            raise PeerMissingError(f"mmcv at {Path(spec.origin).parent} has no ops/cc_attention.py") from None
        mod_spec = importlib.util.spec_from_file_location("nonlocalnet_peer_mmcv_cc_attention", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module  # as an import would (its classes name their module)
        mod_spec.loader.exec_module(module)
        cls = module.CrissCrossAttention
    _CC_CLASS.append(cls)
    return cls


_DNL_CLASS: list[type] = []


def mmseg_dnl_class() -> type:
    """mmsegmentation's ``DisentangledNonLocal2d``: from ``mmseg`` where it imports, else from the installed
    package's own ``models/decode_heads/dnl_head.py``, loaded as a module of its own with what it imports."""
    if _DNL_CLASS:
        return _DNL_CLASS[0]
    cnn = _mmcv_cnn()  # the file's base class, mmcv.cnn.NonLocal2d
    try:
        from mmseg.models.decode_heads import dnl_head  # optional extra `peers`: imported lazily, only here
        cls = dnl_head.DisentangledNonLocal2d
    except (ImportError, AssertionError):  # mmseg's __init__ asserts an mmcv version range
        spec = importlib.util.find_spec("mmseg")  # locates the package without running its __init__
        if spec is None or spec.origin is None:
            raise PeerMissingError("mmsegmentation is not installed (no module mmseg)") from None
        path = Path(spec.origin).parent / "models" / "decode_heads" / "dnl_head.py"
        if not path.is_file():
            raise PeerMissingError(f"mmseg at {Path(spec.origin).parent} has no models/decode_heads/dnl_head.py") \
                from None
        from mmengine.registry import Registry  # optional extra `peers` (mmengine)
        package = "nonlocalnet_peer_mmseg"
        registry = types.ModuleType("mmseg.registry")
        registry.MODELS = Registry("nonlocalnet peer: mmseg models")
        stub = types.ModuleType("mmseg")
        stub.__path__, stub.registry = [], registry
        parent = types.ModuleType(package)
        parent.__path__ = []
        fcn = types.ModuleType(f"{package}.fcn_head")
        fcn.FCNHead = nn.Module  # DNLHead's base: the file defines DNLHead too; it is never built here
        given = {"mmseg": stub, "mmseg.registry": registry, package: parent, f"{package}.fcn_head": fcn}
        saved = {k: sys.modules.get(k) for k in given}
        sys.modules.update(given)
        try:
            mod_spec = importlib.util.spec_from_file_location(f"{package}.dnl_head", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        finally:  # the stubs only while the file runs: a later `import mmseg` sees the real package
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        cls = getattr(module, "DisentangledNonLocal2d", None)
        if not (isinstance(cls, type) and issubclass(cls, cnn.NonLocal2d)):
            raise PeerMissingError(f"{path} defines no DisentangledNonLocal2d(mmcv.cnn.NonLocal2d) class") from None
    _DNL_CLASS.append(cls)
    return cls


@dataclass(frozen=True)
class Peer:
    """A public module and how to map it into ours: ``build(C)`` gives the peer module, ``convert(peer)`` the
    nonlocalnet block (a :mod:`nonlocalnet.compat` converter), ``apply(peer, x)`` calls it as its users do."""

    package: str  # the PyPI package a user installs
    module: str  # what a user calls
    ours: str  # the preset it converts to, with the options that matter
    needs: tuple[str, ...]  # importable top-level modules
    build: Callable[[int], nn.Module]
    convert: Callable[[nn.Module], nn.Module]
    apply: Callable[[nn.Module, torch.Tensor], torch.Tensor] = None  # default: _once
    dim: int = 2  # 2: timed at the sizes H = W; 3: at the clips T x H x W

    def __post_init__(self):
        if self.apply is None:
            object.__setattr__(self, "apply", _once)


def _once(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def _twice(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg's ``CCHead``: the module applied ``recurrence = 2`` times with shared weights."""
    return m(m(x))


PEERS: dict[str, Peer] = {
    "nl/timm": Peer("timm", "timm.layers.NonLocalAttn(C)", "nl (embedded Gaussian, scale C^-1/2, BN)", ("timm",),
                    lambda c: _timm_layers().NonLocalAttn(c), lambda m: from_timm(m)),
    "nl/mmcv": Peer("mmcv-lite", "mmcv.cnn.NonLocal2d(C)", "nl (embedded Gaussian, reduction 2)",
                    ("mmcv", "mmengine"), lambda c: _mmcv_cnn().NonLocal2d(c),
                    lambda m: from_mmcv(m, mode="embedded_gaussian", dim=2, use_scale=True)),
    "nl-dot/mmcv": Peer("mmcv-lite", "mmcv.cnn.NonLocal2d(C, mode='dot_product')", "nl (dot product, /N)",
                        ("mmcv", "mmengine"), lambda c: _mmcv_cnn().NonLocal2d(c, mode="dot_product"),
                        lambda m: from_mmcv(m, mode="dot_product", dim=2)),
    "nl-gauss/mmcv": Peer("mmcv-lite", "mmcv.cnn.NonLocal2d(C, mode='gaussian')", "nl (Gaussian, raw features)",
                          ("mmcv", "mmengine"), lambda c: _mmcv_cnn().NonLocal2d(c, mode="gaussian"),
                          lambda m: from_mmcv(m, mode="gaussian", dim=2)),
    "cc/mmcv": Peer("mmcv-lite", "mmcv.ops.CrissCrossAttention(C)", "cc (C_s = C/8, recurrence 1)",
                    ("mmcv", "mmengine"), lambda c: mmcv_criss_cross_class()(c),
                    lambda m: from_mmcv(m, module="CrissCrossAttention", recurrence=1)),
    "cc-r2/mmcv": Peer("mmcv-lite", "CrissCrossAttention applied twice (mmseg CCHead)", "cc (recurrence 2)",
                       ("mmcv", "mmengine"), lambda c: mmcv_criss_cross_class()(c),
                       lambda m: from_mmcv(m, module="CrissCrossAttention", recurrence=2), _twice),
    "nl3d/mmcv": Peer("mmcv-lite", "mmcv.cnn.NonLocal3d(C)", "nl, dim 3 (embedded Gaussian, reduction 2)",
                      ("mmcv", "mmengine"), lambda c: _mmcv_cnn().NonLocal3d(c),
                      lambda m: from_mmcv(m, mode="embedded_gaussian", dim=3, use_scale=True), dim=3),
    "dnl/mmseg": Peer("mmsegmentation", "mmseg DisentangledNonLocal2d(C, temperature=0.05)",
                      "dnl (DNLHead's defaults: reduction 2, scale, τ = 0.05)", ("mmcv", "mmengine", "mmseg"),
                      lambda c: mmseg_dnl_class()(c, temperature=0.05),
                      lambda m: from_mmseg_dnl(m, temperature=0.05)),
    "gc/mmcv": Peer("mmcv-lite", "mmcv.cnn.ContextBlock(C, 1/16)", "gc (add, bottleneck C/16)",
                    ("mmcv", "mmengine"), lambda c: _mmcv_cnn().ContextBlock(c, 1 / 16),
                    lambda m: from_mmcv(m, module="ContextBlock")),
    "gc/timm": Peer("timm", "timm.layers.GlobalContext(C)", "gc (mul: sigmoid gate, bottleneck C/8)", ("timm",),
                    lambda c: _timm_layers().GlobalContext(c), lambda m: from_timm(m, module="GlobalContext")),
}


def available_peers(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(the peers whose packages import, {missing peer: why})`` among ``names`` (default: all)."""
    found, missing = [], {}
    for name in names or list(PEERS):
        absent = [m for m in PEERS[name].needs if importlib.util.find_spec(m) is None]
        if absent:
            missing[name] = f"{PEERS[name].package} is not installed (no module {', '.join(absent)})"
        else:
            found.append(name)
    return found, missing


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Every parameter and BatchNorm statistic at random (the peers' inits zero their output maps, which would
    make any pair agree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)


def build_pair(name: str, channels: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``(peer, ours)``: the peer module with random weights and our block converted from its state dict."""
    peer = PEERS[name].build(channels)
    _randomize(peer, seed)
    return peer, PEERS[name].convert(peer)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def check_pair(name: str, peer: nn.Module, ours: nn.Module, shape: tuple[int, ...], seed: int = 1) -> float:
    """The largest relative difference, in float64, between the peer and our block: eval forward, train forward
    and the gradient with respect to the input (on copies; the modules given are untouched)."""
    apply = PEERS[name].apply
    p64, o64 = copy.deepcopy(peer).double(), copy.deepcopy(ours).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    worst = 0.0
    with torch.no_grad():
        worst = max(worst, _rel(o64.eval()(x), apply(p64.eval(), x)))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    yp, yo = apply(p64.train(), xs[0]), o64.train()(xs[1])
    w = torch.randn(yp.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (yp * w).sum().backward()
    (yo * w).sum().backward()
    return max(worst, _rel(yo.detach(), yp.detach()), _rel(xs[1].grad, xs[0].grad))


@dataclass
class PeerRow:
    peer: str
    module: str
    shape: str
    mode: str
    threads: int
    max_rel_err: float | None
    peer_ms: float | None
    ours_ms: float | None
    ratio: float | None = None  # peer time / our time (>1: ours is faster)
    peer_mib: float | None = None
    ours_mib: float | None = None
    note: str = ""
    ratio_lo: float | None = None  # with --processes K: the lowest and highest of the K processes' ratios
    ratio_hi: float | None = None
    # with --compile: both modules under torch.compile (inductor), timed in the same interleaved rounds
    peer_compiled_ms: float | None = None
    ours_compiled_ms: float | None = None
    ratio_compiled: float | None = None  # peer compiled / ours compiled


def check_shape(name: str, channels: int) -> tuple[int, ...]:
    """The small odd-sized input a pair is checked on in float64 (``2 × C × 9 × 7``; 3-D ``2 × C × 3 × 5 × 4``)."""
    return (2, channels, 9, 7) if PEERS[name].dim == 2 else (2, channels, 3, 5, 4)


def peer_shapes(name: str, batch: int, channels: int, sizes, video) -> list[tuple[int, ...]]:
    """The inputs a peer is timed on: ``B × C × s × s`` per size (2-D), ``B × C × T × H × W`` per clip (3-D)."""
    if PEERS[name].dim == 2:
        return [(batch, channels, s, s) for s in sizes]
    return [(batch, channels, *clip) for clip in video]


def run_peer_case(name: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int,
                  memory: bool = True, compiled: bool = False) -> PeerRow:
    """One cell: the pair built and checked in float64 (refused above :data:`RTOL`), then timed in float32 on
    ``threads`` intra-op threads, interleaved. ``compiled``: also both under ``torch.compile`` (default inductor
    backend), in the same rounds; what a user gets by default is the eager column."""
    peer, ours = build_pair(name, shape[1])
    row = PeerRow(name, PEERS[name].module, "x".join(map(str, shape)), mode, threads, None, None, None)
    row.max_rel_err = check_pair(name, peer, ours, check_shape(name, shape[1]))
    if not row.max_rel_err <= RTOL:
        row.note = f"refused: outputs differ in float64 (max relative error {row.max_rel_err:.2e} > {RTOL:g})"
        return row
    peer, ours = peer.float(), ours.float()
    apply = PEERS[name].apply
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with num_threads(threads):
        peer.train(mode == "fwd+bwd"), ours.train(mode == "fwd+bwd")
        steps = [timed_step(lambda t: apply(peer, t), x, mode, peer.parameters()),
                 timed_step(ours, x, mode, ours.parameters())]
        if compiled:
            peer_c, ours_c = torch.compile(peer), torch.compile(ours)
            steps += [timed_step(lambda t: apply(peer_c, t), x, mode, peer.parameters()),
                      timed_step(ours_c, x, mode, ours.parameters())]
            for step in steps[2:]:  # compile (and recompile for the backward) before any timing
                step(), step()
        medians = interleaved_medians(steps, repeats)
        t_peer, t_ours = medians[:2]
        if memory:
            row.peer_mib, row.ours_mib = (peak_memory(s, torch.device("cpu")) / 2**20 for s in steps[:2])
    row.peer_ms, row.ours_ms, row.ratio = 1e3 * t_peer, 1e3 * t_ours, t_peer / t_ours
    if compiled:
        row.peer_compiled_ms, row.ours_compiled_ms = 1e3 * medians[2], 1e3 * medians[3]
        row.ratio_compiled = medians[2] / medians[3]
    return row


def format_peers(rows: list[PeerRow]) -> str:
    head = (f"{'peer':14} {'shape':12} {'mode':8} {'thr':>3} {'peer ms':>9} {'ours ms':>9} {'peer/ours':>9} "
            f"{'peer MiB':>9} {'ours MiB':>9} {'f64 err':>8}")
    lines = [head, "-" * len(head)]
    f = _cell
    compiled = any(r.ratio_compiled is not None for r in rows)
    if compiled:
        lines[0] += f" {'peer c ms':>10} {'ours c ms':>10} {'c ratio':>8}"
        lines[1] = "-" * len(lines[0])
    for r in rows:
        spread = f" [{r.ratio_lo:.2f}-{r.ratio_hi:.2f}]" if r.ratio_lo is not None else ""
        extra = (f" {f(r.peer_compiled_ms, '10.3f')} {f(r.ours_compiled_ms, '10.3f')} {f(r.ratio_compiled, '8.2f')}"
                 if compiled else "")
        lines.append(f"{r.peer:14} {r.shape:12} {r.mode:8} {r.threads:3d} {f(r.peer_ms, '9.3f')} "
                     f"{f(r.ours_ms, '9.3f')} {f(r.ratio, '9.2f')} {f(r.peer_mib, '9.2f')} {f(r.ours_mib, '9.2f')} "
                     f"{f(r.max_rel_err, '8.1e')}{extra}{spread} {r.note}".rstrip())
    return "\n".join(lines)


def _merge(runs: list[list[dict]]) -> list[PeerRow]:
    """One row per cell from several processes' rows: median times, memory and ratio, and the ratios' range."""
    out = []
    for cells in zip(*runs):
        first = cells[0]
        row = PeerRow(**{k: first[k] for k in ("peer", "module", "shape", "mode", "threads")},
                      max_rel_err=max((c["max_rel_err"] for c in cells if c["max_rel_err"] is not None), default=None),
                      peer_ms=None, ours_ms=None, note=first.get("note", ""))
        ok = [c for c in cells if c.get("ratio")]
        if ok:
            for k in ("peer_ms", "ours_ms", "peer_mib", "ours_mib", "peer_compiled_ms", "ours_compiled_ms",
                      "ratio_compiled"):
                vals = [c[k] for c in ok if c.get(k) is not None]
                setattr(row, k, statistics.median(vals) if vals else None)
            ratios = [c["ratio"] for c in ok]
            row.ratio, row.ratio_lo, row.ratio_hi = statistics.median(ratios), min(ratios), max(ratios)
            row.note = "" if len(ok) == len(cells) else f"{len(cells) - len(ok)} of {len(cells)} processes failed"
        out.append(row)
    return out


def run_peers(*, peers: list[str] | None = None, sizes: list[int] = (32, 64),
              video: list[tuple[int, int, int]] = ((8, 16, 16),), batch: int = 2, channels: int = 64,
              modes: list[str] = ("fwd", "fwd+bwd"), threads: list[int] = (1, 2), repeats: int = 7,
              memory: bool = True, json_path: str | None = None, processes: int = 1,
              compiled: bool = False) -> list[PeerRow]:
    """Every peer whose package is installed (or ``peers``, each of which must be) against our converted block,
    printed as ``peer time / our time``. No peer installed, or a named one missing: :class:`PeerMissingError`.
    2-D peers run at ``sizes``, 3-D ones at the clips ``video``. ``processes > 1``: the table measured in that
    many fresh processes, one after another, merged (median per cell and the ratios' range)."""
    unknown = [p for p in peers or () if p not in PEERS]
    if unknown:
        raise ValueError(f"peers (--peers): unknown {', '.join(map(repr, unknown))}; valid: {', '.join(PEERS)}")
    found, missing = available_peers(list(peers) if peers else None)
    if peers and missing:
        raise PeerMissingError("bench --baseline peers: " + "; ".join(f"{k}: {v}" for k, v in missing.items()) +
                               " (pip install timm mmcv-lite mmengine, or 'nonlocalnet[peers]')")
    if not found:
        raise PeerMissingError("bench --baseline peers: no peer package is installed (timm, mmcv-lite + mmengine); "
                               "pip install 'nonlocalnet[peers]' (make bench-peers uses .venv-vision)")
    for name, why in missing.items():
        print(f"# skipped {name}: {why}", file=sys.stderr, flush=True)
    env = environment()
    env.update(_versions(found))
    print(f"# nonlocalnet bench --baseline peers — torch {env['torch']}, "
          + ", ".join(f"{k} {v}" for k, v in env.items() if k in ("timm", "mmcv", "mmengine", "mmseg"))
          + f"; {env['processor']}, B={batch}, C={channels}, float32, median of {repeats} interleaved"
          + (f", {processes} processes" if processes > 1 else ""), flush=True)
    if processes > 1:
        argv = ["--peers", *found, "--sizes", *map(str, sizes), "--video", *("x".join(map(str, c)) for c in video),
                "--batch", str(batch), "--channels", str(channels),
                "--modes", *modes, "--threads", *map(str, threads), "--repeats", str(repeats)]
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(processes):
                path = f"{tmp}/run{i}.json"
                print(f"# process {i + 1} of {processes}", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, "-m", "nonlocalnet", "bench", "--baseline", "peers", *argv,
                                *([] if memory else ["--no-memory"]), *(["--compile"] if compiled else []),
                                "--json", path],
                               check=True, stdout=subprocess.DEVNULL)
                with open(path) as fh:
                    runs.append(json.load(fh)["rows"])
        rows = _merge(runs)
    else:
        rows = []
        for name in found:
            for shape in peer_shapes(name, batch, channels, sizes, video):
                for mode in modes:
                    for thr in threads:
                        r = run_peer_case(name, shape, mode, thr, repeats, memory, compiled)
                        print(f"  {name:14} {r.shape:12} {mode:8} {thr}t "
                              f"{(f'{r.ratio:.2f}x' if r.ratio else r.note)}", file=sys.stderr, flush=True)
                        rows.append(r)
    print(format_peers(rows))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "baseline": "peers",
                       "peers": {k: {"package": PEERS[k].package, "module": PEERS[k].module, "ours": PEERS[k].ours}
                                 for k in found},
                       **({"processes": processes} if processes > 1 else {}),
                       "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return rows


def _versions(found: list[str]) -> dict[str, str]:
    """The installed versions of the peer packages in use (from their distributions' metadata)."""
    needs = {m for n in found for m in PEERS[n].needs}
    out = {}
    for dist, key in (("timm", "timm"), ("mmcv-lite", "mmcv"), ("mmcv", "mmcv"), ("mmengine", "mmengine"),
                      ("mmsegmentation", "mmseg")):
        if key in needs and key not in out:
            try:
                out[key] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return out
