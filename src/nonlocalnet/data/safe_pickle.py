"""A restricted unpickler for the CIFAR python-pickle files.

The CIFAR archives are pickles of plain dicts holding numpy arrays, lists, ints and byte strings. Loading
them with :func:`pickle.load` would execute whatever callable a tampered file names, so
:class:`RestrictedUnpickler` resolves only the globals those files need:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (array reconstruction),
* ``numpy.ndarray`` and ``numpy.dtype``,
* ``_codecs.encode`` -- only because Python 3 writes ``bytes`` objects at protocol 2 (the protocol of the
  originals) as ``_codecs.encode(text, "latin1")``; it is wrapped so that any other codec is refused.

Every other global raises :class:`UnsafePickleError` naming the file and the refused global, before
anything is called.
"""

from __future__ import annotations

import codecs
import os
import pickle

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


def _latin1_encoder(path: str):
    def encode(obj, encoding="utf-8", errors="strict"):
        if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
            raise UnsafePickleError(f"refusing to unpickle {path}: _codecs.encode with encoding {encoding!r} "
                                    "is not allowed (only latin1)")
        return codecs.encode(obj, "latin1", errors)

    return encode


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encoder,  # bound to the file's path in find_class
}

ALLOWED_GLOBALS = tuple(f"{m}.{n}" for m, n in _ALLOWED)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy array globals of :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, *, path: str | os.PathLike | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._path = str(path) if path is not None else "<stream>"

    def find_class(self, module: str, name: str):
        try:
            found = _ALLOWED[(module, name)]
            return _latin1_encoder(self._path) if found is _latin1_encoder else found
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {self._path}: global '{module}.{name}' is not allowed "
                f"(allowed: {', '.join(ALLOWED_GLOBALS)})"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to unpickle {self._path}: persistent ids are not allowed")


def load_restricted(path: str | os.PathLike):
    """Load a CIFAR-style pickle with :class:`RestrictedUnpickler`.

    Python 2 strings (the original files) are decoded as latin1, which is what numpy expects for array
    buffers; dict keys that arrive as ``bytes`` are left as they are (see :func:`decode_keys`).
    """
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, path=path, encoding="latin1").load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise ValueError(f"cannot read {path} as a CIFAR pickle: {type(exc).__name__}: {exc}") from exc


def decode_keys(obj: dict) -> dict:
    """Return ``obj`` with ``bytes`` keys decoded (latin1) to ``str``."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
