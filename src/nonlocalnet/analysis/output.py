"""What the analyses write: strict JSON, figures on the Agg canvas, output folders."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nonlocalnet.runs import Loaded

__all__ = ["default_out", "new_figure", "safe_name", "save_figure", "write_json", "write_result"]


def default_out(loaded_or_path: Loaded | Path | None, sub: str) -> Path:
    """``<run dir>/analysis/<sub>``, or ``analysis/<sub>`` when there is no run dir."""
    run_dir = loaded_or_path.run_dir if isinstance(loaded_or_path, Loaded) else loaded_or_path
    return (Path(run_dir) if run_dir is not None else Path(".")) / "analysis" / sub


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return _plain(np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None  # strict JSON: NaN / inf -> null
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    return path


def write_result(path: Path, loaded: Loaded, analysis: str, data_info: dict[str, Any] | None, *,
                 blocks: list[dict[str, Any]], figures: Sequence[Path], **fields: Any) -> dict[str, Any]:
    """Write (:func:`write_json`) and return an analysis' JSON: ``analysis``, ``run``, ``data``, then
    ``fields`` in order, then ``blocks``, ``figures`` (as strings) and the run's ``notes``."""
    data = {"analysis": analysis, "run": loaded.describe(), "data": data_info, **fields,
            "blocks": blocks, "figures": [str(f) for f in figures], "notes": list(loaded.notes)}
    write_json(path, data)
    return data


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "block"
