"""Checkpoints: model weights in safetensors, training state in a ``weights_only``-loadable sidecar.

Files in ``run.out``:

- ``last.safetensors`` + ``last.state.pt``: the latest completed epoch (weights; optimizer, scheduler,
  grad scaler, RNG states, epoch, step, best top-1, metrics history).
- ``best.safetensors``: weights of the epoch with the best test top-1.
- ``epoch_{k:04d}.safetensors``: weights after epoch ``k`` (``run.keep_epochs``).

Every file is written atomically: a temporary file in the same directory, flushed and fsynced, then
``os.replace``; the trainer writes ``last.next.safetensors``, then ``last.state.pt``, then renames the first
to ``last.safetensors``, so a crash never leaves a weights/state pair of different epochs.  The
safetensors metadata records ``epoch``, ``step``, ``arch`` and the resolved config (YAML), so a weights
file alone is enough for ``nonlocalnet eval``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "atomic_write_bytes",
    "capture_rng",
    "check_weights",
    "load_state",
    "load_weights",
    "load_weights_into",
    "read_metadata",
    "restore_rng",
    "save_state",
    "save_weights",
    "state_path",
]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names the file."""


class DiskFullError(CheckpointError):
    """No space left (``ENOSPC``, or the quota: ``EDQUOT``) while writing a file; the file on disk is unchanged."""

    def __init__(self, path: Path, needed: int | None, free: int | None) -> None:
        self.path, self.needed, self.free = path, needed, free
        need = f"it needs {_mib(needed)} free" if needed is not None else "it needs more space"
        left = f", {_mib(free)} are left on that file system" if free is not None else ""
        super().__init__(f"disk full while writing {path}: {need}{left}; the previous version of the file, if "
                         "any, is intact")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` is an ``OSError`` of a full disk or quota."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], size: int | None = None) -> None:
    """Write ``path`` atomically: ``write(fileobj)`` into a temp file in the same dir, fsync, replace.
    A full disk is a :class:`DiskFullError` naming ``path`` and ``size`` (the bytes to be written, when known)."""
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as e:
        if disk_full(e):
            raise DiskFullError(path, size, _free_bytes(path.parent)) from None
        raise


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), len(data))


# ----------------------------------------------------------------------------------------------- weights


def _plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-unshared copies (safetensors refuses shared tensors)."""
    out = {}
    seen: set[int] = set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t.contiguous()
    return out


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Atomically save a state dict as safetensors; metadata values are stored as strings (JSON for
    non-strings)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = save(_plain_state_dict(state_dict), metadata=meta)
    atomic_write_bytes(path, data)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from None


def check_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights that ``load_state_dict`` would take silently but wrongly: a tensor whose dtype is not the
    model's (it would be cast), or a floating tensor with NaN or inf. The message names the tensor and ``path``."""
    own = model.state_dict()
    for key, value in state.items():
        ref = own.get(key)
        if not isinstance(ref, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue  # load_state_dict reports unexpected and missing keys
        if value.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} is {value.dtype} but the model's is {ref.dtype}; "
                                  "loading would cast it silently. Save the checkpoint with the model's dtype (or "
                                  "convert the model with .to(dtype) first)")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} holds NaN or inf ({bad} of {value.numel()} "
                                  "values); a model with it outputs NaN (was it saved after training diverged?)")


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                      what: str = "the configured model") -> None:
    """``model.load_state_dict(state)`` (strict) after :func:`check_weights`; a :class:`CheckpointError` naming
    ``path`` and ``what`` the weights were meant for when they do not fit."""
    check_weights(model, state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {e}") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata (a dict of strings)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000 or n + 8 > path.stat().st_size:
                raise ValueError(f"bad header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from None
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


# ------------------------------------------------------------------------------------------- RNG states


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU/CUDA and the given generators' states, ``weights_only``-safe."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
    saved = state.get("generators", {})
    for k, g in (generators or {}).items():
        if k not in saved:
            raise CheckpointError(f"the saved RNG state has no generator {k!r}")
        g.set_state(saved[k])


# ------------------------------------------------------------------------------------- training state


def state_path(weights_path: str | os.PathLike) -> Path:
    """``last.safetensors`` -> ``last.state.pt``."""
    p = Path(weights_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".state.pt")


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"training state {path} is corrupt: {type(e).__name__}: {e}") from None
