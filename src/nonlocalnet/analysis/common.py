"""Shared plumbing of the analyses: load a run (config + weights -> model), find its nonlocal blocks,
load a batch of the run's data, capture each block's input with hooks, write JSON and figures.

Nothing here needs the training data unless :func:`load_batch` is called.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nonlocalnet.blocks import NonlocalBlock

__all__ = [
    "AnalysisError",
    "Batch",
    "DataError",
    "Loaded",
    "NoBlockError",
    "block_matrices",
    "capture_batch",
    "capture_blocks",
    "dense_affinity",
    "default_out",
    "edges_of",
    "expand_grouped",
    "find_blocks",
    "float64_block",
    "graph_notes",
    "is_channel_graph",
    "nonlinear_reason",
    "load_batch",
    "load_config_only",
    "load_run",
    "poly_label",
    "resolve_checkpoint",
    "save_figure",
    "sorted_by_magnitude",
    "symmetric_eigenvalues",
    "write_json",
    "write_result",
]

EPOCH_RE = re.compile(r"^epoch_(\d+)\.safetensors$")


class AnalysisError(RuntimeError):
    """An analysis that cannot run; the message says why and what to do."""


class NoBlockError(AnalysisError):
    """The model has no nonlocal block."""


class DataError(AnalysisError):
    """The data an analysis looks at could not be loaded."""


# ------------------------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file: ``path`` itself, or in a run dir ``last``, else ``best``, else the latest epoch file."""
    from nonlocalnet.train import CheckpointError

    p = Path(path)
    if p.is_dir():
        for name in ("last.safetensors", "best.safetensors"):
            if (p / name).is_file():
                return p / name
        epochs = epoch_checkpoints(p)
        if epochs:
            return epochs[-1][1]
        raise CheckpointError(f"no checkpoint in {p} (expected last.safetensors, best.safetensors or "
                              "epoch_XXXX.safetensors, as written by `nonlocalnet train`)")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(epoch, path)]`` of the ``epoch_XXXX.safetensors`` files of a run dir, by epoch."""
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = EPOCH_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _config_for(checkpoint: Path, overrides: Sequence[str]):
    import yaml

    from nonlocalnet.train import CheckpointError, apply_overrides, config_from_dict, load_config, read_metadata

    cfg_file = checkpoint.parent / "config.yaml"
    if cfg_file.is_file():
        return load_config(cfg_file, list(overrides)), str(cfg_file)
    meta = read_metadata(checkpoint)
    if "config" not in meta:
        raise CheckpointError(f"no config for checkpoint {checkpoint}: neither {cfg_file} nor config metadata "
                              "in the file")
    return config_from_dict(apply_overrides(yaml.safe_load(meta["config"]) or {}, list(overrides))), \
        f"{checkpoint} (metadata)"


_KNOWN_CLASSES = {"demo": 2, "cifar10": 10, "cifar100": 100, "cub200": 200, "ucf101": 101}


def _num_classes_from_state(cfg, state: dict[str, torch.Tensor]) -> int | None:
    """The classifier width: the backbone's parameters whose shape depends on ``num_classes``."""
    from nonlocalnet.models import build_model

    try:
        a = build_model(cfg.model.arch, 1, **cfg.model.options).state_dict()
        b = build_model(cfg.model.arch, 2, **cfg.model.options).state_dict()
    except (TypeError, ValueError):
        return None
    for key, t in a.items():
        if key in b and b[key].shape != t.shape and t.shape[0] == 1:
            for k2, v in state.items():  # the key may have moved under an insertion wrapper
                if k2 == key or k2.replace(".module.", ".") == key:
                    return int(v.shape[0])
    return None


def _num_classes_from_config(cfg) -> tuple[int, str | None]:
    if cfg.model.num_classes:
        return int(cfg.model.num_classes), None
    name = cfg.data.name
    if name == "cifar100" and cfg.data.options.get("label_type") == "coarse":
        return 20, None
    if name in _KNOWN_CLASSES:
        return _KNOWN_CLASSES[name], None
    root = Path(cfg.data.root)
    sub = root / "train" if (root / "train").is_dir() else root
    if sub.is_dir():
        classes = [d for d in sub.iterdir() if d.is_dir()]
        if classes:
            return len(classes), None
    return 1000, f"number of classes unknown without the data of {name!r}: assumed 1000 (set model.num_classes)"


@dataclass
class Loaded:
    """A model rebuilt from a run: config, weights, and its nonlocal blocks (``{module path: block}``)."""

    source: Path
    checkpoint: Path | None
    run_dir: Path | None
    config_source: str
    cfg: Any
    model: nn.Module
    state: dict[str, torch.Tensor]
    blocks: dict[str, NonlocalBlock]
    num_classes: int
    epoch: int | None = None
    epochs: list[tuple[int, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.source), "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "config": self.config_source, "epoch": self.epoch, "arch": self.cfg.model.arch,
                "num_classes": self.num_classes, "blocks": {k: b.name for k, b in self.blocks.items()}}


def find_blocks(model: nn.Module) -> dict[str, NonlocalBlock]:
    """``{module path: block}`` of every :class:`~nonlocalnet.blocks.NonlocalBlock` in ``model``, in module
    order (an inserted block's path is ``<at>.nonlocal_block``, its state-dict prefix)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NonlocalBlock)}


def edges_of(block: nn.Module) -> nn.Module:
    """The block's :class:`~nonlocalnet.blocks.Affinity` module (``block.edges``; ``block.graph`` in older
    versions)."""
    m = getattr(block, "edges", None)
    return m if m is not None else block.graph


def is_channel_graph(block: nn.Module) -> bool:
    """CGNL: a graph over positions × channels, no ``N × N'`` position affinity."""
    return edges_of(block).mode == "channels"


def nonlinear_reason(block: nn.Module) -> str | None:
    """Why the analyses of the linear maps ``W_t W_g`` (spectrum, filter gains) do not apply to ``block``, or
    ``None`` when they do."""
    unit = block.units[0]
    if getattr(unit, "out_map", "linear") != "linear":
        return (f"{block.name}: each output map is GCNet's bottleneck conv -> LayerNorm -> ReLU -> conv (Cao et al., "
                "ICCVW 2019, arXiv 1904.11492, Eq. 4), not a linear W_t: there is no C x C matrix W_t W_g, so its "
                "eigenvalues (spectrum) and the filter gain ||Σ_t B_t(λ) W_t|| are not defined; not analyzed")
    if "add" not in getattr(unit, "fusion", "add"):
        return (f"{block.name}: fusion='mul' gates X by sigmoid(F) and has no additive W_t W_g; not analyzed")
    return None


def graph_notes(block: nn.Module) -> list[str]:
    """What the block's graph is, where it differs from a single pairwise affinity (GC's unary graph, DNL's sum)."""
    e = edges_of(block)
    notes = []
    if getattr(e, "kernel", None) == "unary":
        notes.append("unary graph (GC): A = 1·aᵀ with a = softmax(w_m X): every row of A is the same a "
                     "(query-independent attention), rank 1, A^k = A; its eigenvalues are 1 (once, eigenvector 1) "
                     "and 0 (N - 1 times)")
    elif getattr(e, "unary", False):
        notes.append("sum graph (DNL, Yin et al., ECCV 2020, arXiv 2006.06668, Eq. 12): A = softmax of the "
                     "whitened pairwise term + 1·aᵀ (the unary term); each row sums to 2 (A 1 = 2·1), A is not "
                     "symmetric; rows, powers and eigenvalues shown are those of the sum")
    if getattr(e, "whiten", False) and not getattr(e, "unary", False):
        notes.append("whitened pairwise term: queries and keys minus their means over positions")
    unit = block.units[0]
    if not hasattr(unit, "g"):
        notes.append("value_proj=False: Z = X (no W_g; W_g = I in the matrices)")
    if getattr(unit, "fusion", "add") == "add_mul":
        notes.append("fusion='add_mul': Y = X ⊙ sigmoid(F_mul) + F_add; only the additive branch (w.*) is analyzed")
    return notes


def _require_blocks(blocks: dict, source: Path) -> None:
    if not blocks:
        raise NoBlockError(f"no nonlocal block in {source}: the model has no NonlocalBlock (a baseline); "
                           "nothing to analyze")


def load_run(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu",
             require_blocks: bool = True) -> Loaded:
    """Rebuild the model of a run dir or a ``.safetensors`` checkpoint, weights loaded, in eval mode.

    The config is the run's ``config.yaml`` (next to the checkpoint) or the one stored in the file's
    metadata, with ``--set`` style ``overrides``. No data is read: the number of classes comes from the
    config or from the classifier's shape in the checkpoint.
    """
    from nonlocalnet.train import CheckpointError, ConfigError, build_model_from_config, load_weights

    source = Path(path)
    ckpt = resolve_checkpoint(source)
    cfg, cfg_source = _config_for(ckpt, overrides)
    state = load_weights(ckpt)
    notes: list[str] = []
    nc = cfg.model.num_classes or _num_classes_from_state(cfg, state)
    if nc is None:
        nc, note = _num_classes_from_config(cfg)
        if note:
            notes.append(note)
    try:
        model = build_model_from_config(cfg, int(nc), load_pretrained=False)
    except ConfigError:
        raise
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model of its config ({cfg_source}): {e}") from None
    model.to(device).eval()
    blocks = find_blocks(model)
    if require_blocks:
        _require_blocks(blocks, source)
    run_dir = ckpt.parent
    epoch = None
    try:
        from nonlocalnet.train import read_metadata

        meta = read_metadata(ckpt)
        epoch = int(meta["epoch"]) if "epoch" in meta else None
    except (CheckpointError, ValueError):
        pass
    return Loaded(source, ckpt, run_dir, cfg_source, cfg, model, state, blocks, int(nc), epoch,
                  epoch_checkpoints(run_dir), notes)


def load_config_only(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu",
                     require_blocks: bool = True) -> Loaded:
    """A model from a config YAML alone (random weights): for analyses that need only shapes (cost)."""
    from nonlocalnet.train import build_model_from_config, load_config

    source = Path(path)
    cfg = load_config(source, list(overrides))
    nc, note = _num_classes_from_config(cfg)
    model = build_model_from_config(cfg, nc, load_pretrained=False).to(device).eval()
    blocks = find_blocks(model)
    if require_blocks:
        _require_blocks(blocks, source)
    return Loaded(source, None, None, str(source), cfg, model, {}, blocks, nc, None, [], [note] if note else [])


def default_out(loaded_or_path: Loaded | Path | None, sub: str) -> Path:
    """``<run dir>/analysis/<sub>``, or ``analysis/<sub>`` when there is no run dir."""
    run_dir = loaded_or_path.run_dir if isinstance(loaded_or_path, Loaded) else loaded_or_path
    return (Path(run_dir) if run_dir is not None else Path(".")) / "analysis" / sub


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Batch:
    """A batch of a run's data: ``x`` normalized float (what the model sees), ``images`` uint8."""

    x: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    info: dict[str, Any]

    def head(self, n: int) -> Batch:
        """The first ``n`` samples."""
        n = max(1, min(int(n), self.x.shape[0]))
        return Batch(self.x[:n], self.images[:n], self.labels[:n], self.indices[:n],
                     dict(self.info, samples=n, indices=self.indices[:n]))


def data_requirement(cfg, split: str = "test") -> str:
    name, root = cfg.data.name, cfg.data.root
    split_name = cfg.data.test_split if split == "test" else cfg.data.train_split
    if name == "demo":
        return f"the {split_name!r} split of the bundled 'demo' dataset (generated, no files needed)"
    return f"the {split_name!r} split of dataset {name!r} under root {root!r}"


def load_batch(cfg, *, count: int, split: str = "test", data_root: str | None = None, what: str = "this analysis",
               device: str | torch.device = "cpu") -> Batch:
    """The first ``count`` samples of the run's ``split`` (``test`` or ``train``), without augmentation.

    Raises :class:`DataError` naming the dataset and root the run's config points to when they cannot be read.
    """
    from nonlocalnet.data import BatchTransform, build_dataset

    cfg = copy.deepcopy(cfg)
    if data_root is not None:
        cfg.data.root = str(data_root)
    split_name = cfg.data.test_split if split == "test" else cfg.data.train_split
    opts: dict[str, Any] = {}
    if cfg.data.size is not None:
        opts["size"] = cfg.data.size
    if cfg.data.frames is not None:
        opts["frames"] = cfg.data.frames
    opts.update(cfg.data.options)
    # demo: generated in memory; do not write a cache file unless a root was asked for explicitly
    root = None if (cfg.data.name == "demo" and data_root is None) else cfg.data.root
    need = data_requirement(cfg, split)
    try:
        ds = build_dataset(cfg.data.name, root, split_name, **opts)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
        raise DataError(f"{what} looks at data: it needs {need} (from the run's config). Loading it failed: "
                        f"{type(e).__name__}: {e}. Pass --data-root DIR or --set data.root=DIR (or another "
                        "data.* key); the 'demo' dataset needs no files.") from None
    n = min(int(count), len(ds))
    if n < 1:
        raise DataError(f"{what}: {need} is empty")
    samples = [ds[i] for i in range(n)]
    images = torch.stack([torch.as_tensor(s[0]) for s in samples])
    labels = torch.as_tensor([int(s[1]) for s in samples])
    tf = ds.batch_transform(False) if hasattr(ds, "batch_transform") else BatchTransform(ds.mean, ds.std,
                                                                                          train=False)
    x = tf(images.to(device))
    info = {"dataset": cfg.data.name, "root": None if root is None else str(root), "split": split_name,
            "samples": n, "indices": list(range(n)), "input_shape": list(images.shape[1:]), "needs": need}
    return Batch(x, images, labels, list(range(n)), info)


# ------------------------------------------------------------------------------------------ capture


@torch.no_grad()
def capture_blocks(model: nn.Module, blocks: dict[str, nn.Module], x: torch.Tensor
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (input, output)}`` of each block during one eval-mode forward pass of ``model`` on ``x``
    (forward hooks; the first call of each block when it is called more than once)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fn(module, args, out):
            if name not in seen:
                seen[name] = (args[0].detach().clone(), out.detach().clone())
        return fn

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    try:
        for name, b in blocks.items():
            handles.append(b.register_forward_hook(hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in blocks if n not in seen]
    if missing:
        raise AnalysisError(f"block(s) {', '.join(missing)} were not called in the forward pass")
    return seen


def capture_batch(loaded: Loaded, batch: Batch | None, *, images: int, split: str, data_root: str | None,
                  what: str) -> tuple[Batch, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The batch an analysis runs on — ``batch.head(images)`` when one is given (e.g. shared by the report),
    else the first ``images`` samples of ``split`` (:func:`load_batch`) — and its :func:`capture_blocks`."""
    if batch is None:
        batch = load_batch(loaded.cfg, count=images, split=split, data_root=data_root, what=what)
    else:
        batch = batch.head(images)
    return batch, capture_blocks(loaded.model, loaded.blocks, batch.x)


def float64_block(block: nn.Module) -> nn.Module:
    """A float64, eval-mode copy of ``block`` (the model is left untouched)."""
    return copy.deepcopy(block).double().eval()


def dense_affinity(block: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The block's dense affinity ``A`` (``(B, N, N')``) for input ``x``, computed in float64 on a copy."""
    with torch.no_grad():
        return float64_block(block).affinity(x.double()).cpu().numpy()


# ------------------------------------------------------------------------------------------ matrices


def expand_grouped(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A (possibly grouped) 1×1 conv weight ``(C_out, C_in/G, 1, ..)`` as the dense ``C_out × C_in`` matrix
    it applies (block-diagonal for ``G > 1``: output group ``g`` reads input group ``g``)."""
    w = weight.reshape(weight.shape[0], -1)
    c_out, cin_g = w.shape
    groups = in_channels // cin_g
    if groups == 1:
        return w.clone()
    full = torch.zeros(c_out, in_channels, dtype=w.dtype)
    og = c_out // groups
    for g in range(groups):
        full[g * og:(g + 1) * og, g * cin_g:(g + 1) * cin_g] = w[g * og:(g + 1) * og]
    return full


def poly_label(coef_row: Sequence[float]) -> str:
    """``B_t(A) = Σ_k coef[k] T_k(A)`` in the power basis, e.g. ``[-1, 2] -> "2A - I"``."""
    from numpy.polynomial import chebyshev

    p = chebyshev.cheb2poly(np.asarray(coef_row, dtype=float))
    parts = []
    for k in range(len(p) - 1, -1, -1):
        c = float(p[k])
        if abs(c) < 1e-12:
            continue
        mono = "I" if k == 0 else ("A" if k == 1 else f"A^{k}")
        mag = abs(c)
        body = mono if mag == 1 else f"{mag:g}{mono}"
        sign = "-" if c < 0 else "+"
        parts.append((sign, body))
    if not parts:
        return "0"
    s = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, body in parts[1:]:
        s += f" {sign} {body}"
    return s


def block_matrices(name: str, block: NonlocalBlock, state: dict[str, torch.Tensor] | None = None
                   ) -> list[dict[str, Any]]:
    """For each unit ``i`` and filter term ``t``: the keys and matrices of ``W_t`` (``C × C_v``) and ``W_g``
    (``C_v × C``), read from ``state`` (default: the block's own weights) by state-dict key.

    ``out_proj=False`` (CC): no ``W_t``; the entry has ``w_key=None`` and ``w=None``.
    """
    own = {f"{name}.{k}": v for k, v in block.state_dict().items()}
    state = own if state is None else state
    reason = nonlinear_reason(block)
    if reason is not None:
        raise AnalysisError(reason)
    out = []
    for i, unit in enumerate(block.units):
        g_key = f"{name}.units.{i}.g.weight"
        if not hasattr(unit, "g"):  # value_proj=False: Z = X
            g_key = None
            wg = torch.eye(block.in_channels, dtype=torch.float64)
        elif g_key not in state:
            raise AnalysisError(f"state dict has no {g_key}")
        else:
            wg = state[g_key].detach().cpu().double().reshape(state[g_key].shape[0], -1)  # C_v × C
        coef = unit.coef.tolist()
        if not len(unit.w):
            out.append({"unit": i, "term": 0, "coef": coef[0], "poly": poly_label(coef[0]), "g_key": g_key,
                        "w_key": None, "wg": wg, "w": None, "groups": 1})
            continue
        for t, conv in enumerate(unit.w):
            w_key = f"{name}.units.{i}.w.{t}.weight"
            if w_key not in state:
                raise AnalysisError(f"state dict has no {w_key}")
            w = expand_grouped(state[w_key].detach().cpu().double(), wg.shape[0])  # C × C_v
            out.append({"unit": i, "term": t, "coef": coef[t], "poly": poly_label(coef[t]), "g_key": g_key,
                        "w_key": w_key, "wg": wg, "w": w, "groups": int(conv.groups)})
    return out


def symmetric_eigenvalues(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of ``(W + Wᵀ)/2`` sorted by magnitude, largest first."""
    w = np.asarray(w, dtype=np.float64)
    return sorted_by_magnitude(np.linalg.eigvalsh(0.5 * (w + w.T)))


def sorted_by_magnitude(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=np.float64)
    order = np.argsort(-np.abs(v), kind="stable")
    return v[order]


# --------------------------------------------------------------------------------------------- output


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "block"
