"""The placement schema: where a nonlocal block goes in a model, as a plain (YAML-friendly) dict.

One schema for the Python API (:func:`nonlocalnet.models.insert_blocks`) and the config files
(``model.blocks``): :func:`check_placement` validates everything that does not depend on the model;
:func:`nonlocalnet.models.insert.resolve_placement` then resolves named positions in a given model.

Keys (the module docstring of :mod:`nonlocalnet.models.insert` has the full story):
``at`` | ``stage`` | ``res`` (exactly one), optionally one of ``after_block``, ``before_block``,
``after_last``, ``before_last``; ``where`` (after/before), ``block``, ``units``, ``count``, ``dim``,
``in_channels``, ``options``; the feature layout ``layout`` (channels_first / channels_last / tokens), with
``grid`` and ``prefix_tokens`` for tokens (only needed where the model does not say; see
:mod:`nonlocalnet.models.layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CONTAINER_KEYS", "LAYOUTS", "PLACEMENT_KEYS", "POSITION_KEYS", "WHERE", "check_placement"]

POSITION_KEYS = ("after_block", "before_block", "after_last", "before_last")
CONTAINER_KEYS = ("stage", "res")
WHERE = ("after", "before")
LAYOUTS = ("channels_first", "channels_last", "tokens")
PLACEMENT_KEYS: tuple[str, ...] = ("at", "where", "block", "units", "count", "dim", "in_channels", "options",
                                   *CONTAINER_KEYS, *POSITION_KEYS, "layout", "grid", "prefix_tokens")
_MINIMUM = {"stage": 1, "res": 2, "after_block": 1, "before_block": 1, "units": 1, "count": 1, "dim": 1,
            "in_channels": 1, "prefix_tokens": 0}


def int_key(spec: Mapping, key: str, default: int | None = None) -> int | None:
    """``spec[key]`` as an int of at least its minimum (``res`` >= 2, the rest >= 1), or ``default``."""
    val = spec.get(key, default)
    if val is None:
        return None
    low = _MINIMUM[key]
    if isinstance(val, bool) or not isinstance(val, int) or val < low:
        raise ValueError(f"placement key {key!r} must be an integer >= {low}, got {val!r} in {dict(spec)}")
    return val


def check_placement(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a placement dict without a model; returns it with ``where`` implied by its position key
    (``None`` when neither is given). Raises TypeError/ValueError naming the key and the valid values."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"a placement must be a dict, got {type(spec).__name__}: {spec!r}")
    unknown = [k for k in spec if k not in PLACEMENT_KEYS]
    if unknown:
        raise ValueError(f"placement {dict(spec)} has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(PLACEMENT_KEYS)}")
    targets = [k for k in ("at", *CONTAINER_KEYS) if spec.get(k) is not None]
    if len(targets) != 1:
        raise ValueError(f"placement {dict(spec)} must give exactly one of 'at', 'stage', 'res' "
                         f"(got {targets or 'none'})")
    if "at" in targets and (not isinstance(spec["at"], str) or not spec["at"]):
        raise ValueError(f"placement key 'at' must be a non-empty module path, got {spec['at']!r}")
    positions = [k for k in POSITION_KEYS if spec.get(k) not in (None, False)]
    if len(positions) > 1:
        raise ValueError(f"placement {dict(spec)} gives several positions {positions}; use at most one")
    where = spec.get("where")
    if where is not None and where not in WHERE:
        raise ValueError(f"placement key 'where' must be 'after' or 'before', got {where!r}")
    if positions:
        key = positions[0]
        implied = "after" if key.startswith("after") else "before"
        if where is not None and where != implied:
            raise ValueError(f"placement {dict(spec)}: {key!r} implies where={implied!r}, but where={where!r}")
        where = implied
        if key.endswith("_last") and spec[key] is not True:
            raise ValueError(f"placement key {key!r} must be true or false, got {spec[key]!r}")
    for key in _MINIMUM:
        int_key(spec, key)
    if spec.get("dim") is not None and spec["dim"] > 3:
        raise ValueError(f"placement key 'dim' must be 1, 2 or 3, got {spec['dim']}")
    layout = spec.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"placement key 'layout' must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    grid = spec.get("grid")
    if grid is not None:
        if (isinstance(grid, str | bytes) or not hasattr(grid, "__len__") or not 1 <= len(grid) <= 3
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
            raise ValueError(f"placement key 'grid' must be a list of 1 to 3 positive integers (the token grid, "
                             f"e.g. [14, 14]), got {grid!r}")
        if layout not in (None, "tokens"):
            raise ValueError(f"placement key 'grid' is for layout 'tokens', not {layout!r}")
        if spec.get("dim") is not None and spec["dim"] != len(grid):
            raise ValueError(f"placement {dict(spec)}: dim={spec['dim']} but grid {list(grid)} has {len(grid)} axes")
    if spec.get("prefix_tokens") is not None and layout not in (None, "tokens"):
        raise ValueError(f"placement key 'prefix_tokens' is for layout 'tokens', not {layout!r}")
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"placement key 'options' must be a dict, got {options!r}")
    clash = [k for k in ("units", "dim", "in_channels") if k in options]
    if clash:
        raise ValueError(f"give {clash} as top-level placement keys, not inside 'options'")
    block = spec.get("block")
    if block is not None and not isinstance(block, str):
        raise ValueError(f"placement key 'block' must be a block name (str), got {block!r}")
    out = dict(spec)
    out["where"] = where
    return out
