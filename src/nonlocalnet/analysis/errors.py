"""The errors of the analyses: each says why an analysis cannot run and what to do."""

from __future__ import annotations

__all__ = ["AnalysisError", "DataError", "NoBlockError", "require_blocks"]


class AnalysisError(RuntimeError):
    """An analysis that cannot run; the message says why and what to do."""


class NoBlockError(AnalysisError):
    """The model has no nonlocal block."""


class DataError(AnalysisError):
    """The data an analysis looks at could not be loaded."""


def require_blocks(loaded) -> None:
    """Raise :class:`NoBlockError` when the loaded model has no nonlocal block (a baseline)."""
    if not loaded.blocks:
        raise NoBlockError(f"no nonlocal block in {loaded.source}: the model has no NonlocalBlock (a baseline); "
                           "nothing to analyze")
