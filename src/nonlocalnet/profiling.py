"""Measuring: wall time, peak memory and FLOPs of a call. Used by ``bench`` and ``analyze cost``.

- :func:`median_time`: median wall time over repeats after a warm-up, synchronizing CUDA.
- :func:`peak_memory`: peak bytes allocated while a call runs, above what was live before — on CUDA the
  allocator's ``max_memory_allocated``; on CPU the highest sum of live bytes from the profiler's allocation
  records (``profile_memory=True``), i.e. the largest live set of intermediates. Measured, not estimated.
- :func:`count_flops`: :class:`torch.utils.flop_counter.FlopCounterMode` on a forward pass (2 per
  multiply-add), with the CPU flash-attention kernel counted too.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter as fcm

__all__ = ["count_flops", "median_time", "peak_memory", "quiet_stderr"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
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


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level stderr for the duration (the CPU profiler prints log lines per profile)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was live before (measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _register_cpu_flash_attention() -> None:
    """FlopCounterMode counts the CUDA fused-attention ops but not the CPU flash kernel that
    ``scaled_dot_product_attention`` dispatches to; count it with torch's own SDPA formula."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fcm.flop_registry:
        return

    @fcm.register_flop_formula(op)
    def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fcm.sdpa_flop_count(query_shape, key_shape, value_shape)


def _register_inplace_matmuls() -> None:
    """FlopCounterMode has formulas for ``baddbmm``/``addmm`` but not their in-place forms, which the blocks use to
    accumulate into a fresh output (blocks.NonlocalUnit): count them with the same formulas."""
    for name, base in (("baddbmm_", "baddbmm"), ("addmm_", "addmm")):
        op = getattr(torch.ops.aten, name, None)
        if op is None or op in fcm.flop_registry:
            continue
        fcm.register_flop_formula(op, get_raw=True)(fcm.flop_registry[getattr(torch.ops.aten, base)])


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``module(x)`` (no_grad) as counted by :class:`FlopCounterMode` (2 per multiply-add)."""
    _register_cpu_flash_attention()
    _register_inplace_matmuls()
    with torch.no_grad(), fcm.FlopCounterMode(display=False) as fc:
        module(x)
    return int(fc.get_total_flops())
