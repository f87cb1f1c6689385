"""``cost``: parameters, FLOPs and peak activation memory of the backbone and of each block (as in
Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Table 6).

- Input: the model's real per-sample input shape (from the run's data config: CIFAR 3×32×32, ``data.size``,
  ``data.frames``, or the dataset's defaults; for a model given in Python without a config, ``input_shape`` of
  ``Loaded.from_model`` or what the model says, e.g. timm's ``pretrained_cfg``; ``--input-shape`` overrides),
  batch ``--batch`` (1).
- FLOPs are counted, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` on a forward pass, so
  they are those of the path actually taken (matmuls, convolutions, attention kernels; 1 multiply-add = 2
  FLOPs; element-wise ops, norms and softmax are not counted, as in the usual tables). ``GMACs = GFLOPs / 2``
  is what Zhu et al. 2021 Table 6 calls "Flops (G)" (ResNet-50: 4.1).
- Each block is counted alone on its real input (captured with a forward hook): once as built (``auto``,
  its graph's backend reported), once rebuilt with ``backend="dense"`` (same weights): the ``N × N'``
  formulation.
- Peak activation memory is measured (:func:`nonlocalnet.profiling.peak_memory`): on CUDA the allocator's peak;
  on CPU the largest live set of bytes allocated during the call, from the profiler's allocation records;
  inference is a ``no_grad`` forward, training a forward + backward of ``sum(output)``.
- Sizes: parameters (M); "+" columns are over the backbone: the same model with its inserted blocks taken
  out (:func:`nonlocalnet.models.strip_blocks`), so any model given in Python is measured right.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nonlocalnet.models import strip_blocks
from nonlocalnet.presets import build_block
from nonlocalnet.profiling import count_flops, peak_memory
from nonlocalnet.runs import Loaded, find_blocks

from .capture import capture_blocks
from .errors import AnalysisError, require_blocks
from .output import write_json

__all__ = ["dense_copy", "run_cost"]


def dense_copy(block: nn.Module) -> nn.Module:
    """The same block (same weights) with ``backend="dense"``: the materialized ``N × N'`` formulation."""
    opts = dict(block.options)
    opts["backend"] = "dense"
    if len(block.units) > 1:
        opts["units"] = len(block.units)
    dense = build_block(block.name, block.in_channels, dim=block.dim, **opts)
    dense.load_state_dict(block.state_dict())
    p = next(block.parameters())
    return dense.to(p.device, p.dtype).train(block.training)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _backend_taken(block: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad():
        return str(block.build_graph(x).backend)


def _train_peak(module: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    x = x.detach().clone().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    peak = peak_memory(step, device)
    module.zero_grad(set_to_none=True)
    return peak


def _infer_peak(module: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    def step():
        with torch.no_grad():
            module(x)

    return peak_memory(step, device)


def _fmt(v: float | None, spec: str, plus: bool = False) -> str:
    if v is None:
        return "—"
    return ("+" if plus and v >= 0 else "") + format(v, spec)


def _mib(d: dict[str, Any], key: str) -> float | None:
    return d[key] / 2**20 if d.get(key) is not None else None


def format_markdown(data: dict[str, Any]) -> str:
    """The tables of ``cost.json`` as Markdown (Zhu et al. 2021 Table 6 layout: backbone, then "+" per block)."""
    bb, tot = data["backbone"], data["total"]
    lines = [
        f"# Cost of {data['run']['arch']} with nonlocal blocks",
        "",
        f"Input: batch {data['batch']} x {tuple(data['input_shape'])}, device {data['device']}. FLOPs counted by "
        "torch.utils.flop_counter.FlopCounterMode (1 multiply-add = 2 FLOPs; GMACs = GFLOPs/2 is Zhu et al. 2021's "
        "Table 6 'Flops (G)'). Peak memory measured (inference: no_grad forward; training: forward+backward).",
        "",
        "| model | params (M) | GFLOPs | GMACs | peak inference MiB (block rows: the block alone) |",
        "|---|---:|---:|---:|---:|",
        f"| backbone ({data['run']['arch']}) | {bb['params'] / 1e6:.4f} | {bb['flops'] / 1e9:.4f} | "
        f"{bb['flops'] / 2e9:.4f} | {_fmt(_mib(bb, 'peak_inference_bytes'), '.2f')} |",
    ]
    for b in data["blocks"]:
        lines.append(f"| + {b['block']} ({b['preset']}, {b['backend_auto']}) | +{b['params'] / 1e6:.4f} | "
                     f"+{b['flops_auto'] / 1e9:.4f} | +{b['flops_auto'] / 2e9:.4f} | "
                     f"{_fmt(_mib(b, 'peak_inference_auto_bytes'), '.2f')} |")
    lines.append(f"| **total** | {tot['params'] / 1e6:.4f} | {tot['flops'] / 1e9:.4f} | {tot['flops'] / 2e9:.4f} | "
                 f"{_fmt(_mib(tot, 'peak_inference_bytes'), '.2f')} |")
    lines += [
        "",
        "Per block, the path taken (`auto`) against the dense N x N' formulation (`dense`), same weights:",
        "",
        "| block | N | N' | C | backend | MFLOPs auto | MFLOPs dense | dense/auto | inference peak MiB auto / dense | "
        "training peak MiB auto / dense |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b in data["blocks"]:
        fd = b["flops_dense"]
        ratio = fd / b["flops_auto"] if fd is not None and b["flops_auto"] else None
        inf = (f"{_fmt(_mib(b, 'peak_inference_auto_bytes'), '.2f')} / "
               f"{_fmt(_mib(b, 'peak_inference_dense_bytes'), '.2f')}")
        trn = (f"{_fmt(_mib(b, 'peak_training_auto_bytes'), '.2f')} / "
               f"{_fmt(_mib(b, 'peak_training_dense_bytes'), '.2f')}")
        lines.append(f"| {b['block']} | {b['n']} | {b['n_keys'] if b['n_keys'] is not None else '—'} | "
                     f"{b['in_channels']} | {b['backend_auto']} | {b['flops_auto'] / 1e6:.3f} | "
                     f"{_fmt(fd / 1e6 if fd is not None else None, '.3f')} | {_fmt(ratio, '.2f')} | {inf} | {trn} |")
    lines += ["", f"Check: total - backbone FLOPs = {(tot['flops'] - bb['flops']) / 1e6:.3f} M; sum of the blocks' "
              f"FLOPs = {sum(b['flops_auto'] for b in data['blocks']) / 1e6:.3f} M."]
    for n in data.get("notes", []):
        lines.append(f"\nNote: {n}")
    return "\n".join(lines) + "\n"


def run_cost(loaded: Loaded, out: Path, *, input_shape: tuple[int, ...] | None = None, batch: int = 1,
             memory: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Count and measure; writes ``cost.json`` and ``cost.md``; returns the JSON data."""
    require_blocks(loaded)
    out = Path(out)
    dev = torch.device(device)
    model = loaded.model.to(dev).eval()
    try:
        shape = tuple(input_shape) if input_shape else loaded.model_input_shape()
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(dev)
    notes = list(loaded.notes)

    backbone = strip_blocks(model).eval()  # the inserted blocks taken out, never a rebuild from a name
    if find_blocks(backbone):
        notes.append("the backbone itself contains nonlocal blocks (not inserted by insert_blocks)")
    bb = {"params": _params(backbone), "flops": count_flops(backbone, x)}
    tot = {"params": _params(model), "flops": count_flops(model, x)}
    if memory:
        bb["peak_inference_bytes"] = _infer_peak(backbone, x, dev)
        tot["peak_inference_bytes"] = _infer_peak(model, x, dev)

    io = capture_blocks(model, loaded.blocks, x)
    blocks = []
    for name, block in loaded.blocks.items():
        xin = io[name][0]
        rec: dict[str, Any] = {"block": name, "preset": block.name, "in_channels": block.in_channels,
                               "input_shape": list(xin.shape), "params": _params(block),
                               "units": len(block.units), "recurrence": block.recurrence}
        try:
            g = block.build_graph(xin)
            rec.update(n=int(g.n), n_keys=int(g.n_keys))
        except (ValueError, RuntimeError):
            rec.update(n=int(xin[0, 0].numel()), n_keys=None)
        rec["backend_auto"] = _backend_taken(block, xin)
        rec["flops_auto"] = count_flops(block, xin)
        try:
            dense = dense_copy(block).eval()
            rec["backend_dense"] = _backend_taken(dense, xin)
            rec["flops_dense"] = count_flops(dense, xin)
        except (ValueError, TypeError) as e:
            dense = None
            rec["flops_dense"] = None
            rec["note"] = f"no dense variant: {e}"
        if memory:
            rec["peak_inference_auto_bytes"] = _infer_peak(block, xin, dev)
            rec["peak_training_auto_bytes"] = _train_peak(copy.deepcopy(block).train(), xin, dev)
            if dense is not None:
                rec["peak_inference_dense_bytes"] = _infer_peak(dense, xin, dev)
                rec["peak_training_dense_bytes"] = _train_peak(dense.train(), xin, dev)
        blocks.append(rec)
    data = {"analysis": "cost", "run": loaded.describe(), "input_shape": list(shape), "batch": batch,
            "device": str(dev),
            "definition": {"flops": "torch.utils.flop_counter.FlopCounterMode total (2 FLOPs per multiply-add)",
                           "macs": "flops / 2 (Zhu et al. 2021 Table 6 'Flops (G)')",
                           "peak memory": "nonlocalnet.profiling.peak_memory: CUDA max_memory_allocated above the "
                                          "baseline, or the CPU profiler's largest live allocation set",
                           "plus": "block rows: the block's own parameters and FLOPs (over the backbone)"},
            "backbone": bb, "total": tot, "blocks": blocks,
            "plus": {"params": tot["params"] - bb["params"], "flops": tot["flops"] - bb["flops"]},
            "notes": notes}
    write_json(out / "cost.json", data)
    (out / "cost.md").write_text(format_markdown(data))
    return data
