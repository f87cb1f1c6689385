"""Insert nonlocal blocks into any ``nn.Module`` (ours, torchvision, timm, ...).

Placements are plain dicts (YAML-friendly)::

    {"at": "layer3.5", "where": "before", "block": "nl", "units": 1, "count": 1, "dim": 2, "options": {}}

The module at ``at`` is replaced by ``Inserted(module, nonlocal_block, where, layout=...)``, which computes
``nonlocal_block(module(x))`` ("after", the default) or ``module(nonlocal_block(x))`` ("before"); channels-last
features and tokens are turned channels-first for the block and back (``Inserted.layout``).

State-dict paths (predictable by construction):

* the wrapped module's keys move from ``<at>.<rest>`` to ``<at>.module.<rest>``;
* the block's keys are ``<at>.nonlocal_block.<...>`` (``count: 1``) or ``<at>.nonlocal_block.<i>.<...>``
  (``count: n``, ``i = 0..n-1`` in the order the input flows through them).

Use :func:`remap_state_dict` to load a checkpoint saved before the insertion, :func:`inserted_blocks` to
list the blocks. Paths in placements always use the *original* names: a wrapper met on the way is crossed
transparently (``layer3.5`` still works after ``layer3`` was wrapped), and ``Inserted`` forwards unknown
attributes and ``[i]`` to the wrapped module.

Placement keys:

``at``           dotted module path (as in ``model.named_modules()``), or a named position:
``stage: k``     the container ``stage{k}`` (PreResNet) or, if absent, ``layer{k}`` (ResNet), ``stages.{k-1}``
                 (timm ConvNeXt, ...) or ``layers.{k-1}`` (timm Swin);
``res: r``       the container ``layer{r-1}`` (ResNet stage "res{r}", r = 2..5) or, if absent, ``stage{r-1}``, or
                 the module timm's ``feature_info`` lists at reduction ``2**r`` (res4 = reduction 16; an error
                 when several modules share it, as in a ViT);
                 optionally refined by one of (1-based, counted over the container's children)
``after_block: j``   -> ``<container>.<j-th child>``, where "after"
``before_block: j``  -> ``<container>.<j-th child>``, where "before"
``after_last: true`` / ``before_last: true`` -> the last child, where "after" / "before";
                 without a refinement the container itself is the target. A refinement can also be applied
                 to an explicit ``at`` container (``{"at": "features", "after_block": 3}``).
``where``        "after" (default) or "before".
``block``        block name for the factory (``nonlocalnet.build_block`` by default).
``units``        n >= 1: ONE block made of n units sharing one affinity (passed as ``units=n`` when n > 1).
``count``        n >= 1: n separate blocks chained at the same place.
``dim``          spatial rank the block works on (1, 2, 3); inferred from the tensor when omitted; when
                 given it must match.
``in_channels``  skip channel inference for this placement (no dry forward needed if ``dim`` is given too).
``options``      extra keyword arguments for the factory.
``layout``       the features' layout at the target: ``channels_first`` (B, C, *S), ``channels_last``
                 (B, *S, C) or ``tokens`` (B, L, C); taken from the model where it says
                 (:mod:`nonlocalnet.models.layout`), an error when ambiguous.
``grid``         tokens: the patch grid ``[h, w]`` (``[t, h, w]``); ``prefix_tokens``: class/register tokens in
                 front (default ``L - prod(grid)``). They stay out of the graph and pass through unchanged.

Examples (the placements of the papers):

* PreResNet, "after the 2nd residual block of stage k": ``{"stage": k, "after_block": 2}`` -> ``stage{k}.1``;
* ResNet-50 / 3-D ResNet, "before the last residual block of res4": ``{"res": 4, "before_last": true}``
  -> ``layer3.5``, where "before";
* several blocks at one place as one stage sharing one affinity:
  ``{"stage": 1, "after_block": 2, "units": 3}``; as separate chained blocks:
  ``{"stage": 1, "after_block": 2, "count": 3}``; at different places: a list of placements.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Inserted",
    "BlockChain",
    "PLACEMENT_KEYS",
    "resolve_placement",
    "insert_blocks",
    "inserted_blocks",
    "remap_state_dict",
    "get_module",
    "strip_blocks",
    "default_input_shape",
]

from nonlocalnet.presets import build_block

from .layout import Layout, check_stated_layout, feature_layout, model_feature_info
from .placement import PLACEMENT_KEYS, POSITION_KEYS, WHERE, check_placement, int_key


class BlockChain(nn.Sequential):
    """``count: n`` separate blocks applied one after the other (keys ``nonlocal_block.<i>.*``)."""


class Inserted(nn.Module):
    """A module with a nonlocal block before or after it.

    Attributes:
        module: the original module (state-dict keys ``<at>.module.*``).
        nonlocal_block: the inserted block, or a :class:`BlockChain` for ``count > 1``
            (keys ``<at>.nonlocal_block.*``).
        where: ``"after"`` or ``"before"``.
        placement: the resolved placement dict (plain attribute, not saved in the state dict).
        layout: the :class:`~nonlocalnet.models.layout.Layout` of the features there (None: channels-first).
    """

    def __init__(
        self,
        module: nn.Module,
        nonlocal_block: nn.Module,
        where: str = "after",
        placement: dict | None = None,
        layout: Layout | None = None,
    ) -> None:
        super().__init__()
        if where not in WHERE:
            raise ValueError(f"where must be 'after' or 'before', got {where!r}")
        self.module = module
        self.nonlocal_block = nonlocal_block
        self.where = where
        self.placement = dict(placement or {})
        self.layout = layout

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is None or self.layout.kind == "channels_first":
            return self.nonlocal_block(x)
        y, prefix = self.layout.to_channels_first(x)
        return self.layout.from_channels_first(self.nonlocal_block(y), prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.where == "after":
            return self._block(self.module(*args, **kwargs))
        if not args:
            raise TypeError("Inserted(where='before') needs the input tensor as first positional argument")
        return self.module(self._block(args[0]), *args[1:], **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def __getitem__(self, idx: Any) -> Any:
        return self.module[idx]

    def extra_repr(self) -> str:
        if self.layout is None or self.layout.kind == "channels_first":
            return f"where={self.where!r}"
        extra = f", grid={list(self.layout.spatial)}, prefix_tokens={self.layout.prefix}" \
            if self.layout.kind == "tokens" else ""
        return f"where={self.where!r}, layout={self.layout.kind!r}{extra}"


# ----------------------------------------------------------------------------------------------- paths


def _walk(model: nn.Module, path: str) -> tuple[nn.Module | None, str, str, str]:
    """Follow ``path`` crossing ``Inserted`` wrappers transparently.

    Returns ``(module or None, canonical_path, longest_valid_canonical_prefix, failing_component)``.
    """
    if path == "":
        return model, "", "", ""
    cur, canon = model, []
    for part in path.split("."):
        children = cur._modules
        if part not in children and isinstance(cur, Inserted):
            cur, canon = cur.module, [*canon, "module"]
            children = cur._modules
        if part not in children or children[part] is None:
            return None, "", ".".join(canon), part
        cur, canon = children[part], [*canon, part]
    return cur, ".".join(canon), ".".join(canon), ""


def _path_error(model: nn.Module, path: str, what: str = "module path") -> ValueError:
    _, _, prefix, part = _walk(model, path)
    parent = get_module(model, prefix) if prefix else model
    if isinstance(parent, Inserted):
        parent, prefix = parent.module, f"{prefix}.module" if prefix else "module"
    kids = [f"{prefix}.{n}" if prefix else n for n, m in parent.named_children()]
    shown = ", ".join(kids[:24]) + (f", ... ({len(kids)} in all)" if len(kids) > 24 else "")
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(path, names, n=6, cutoff=0.5)
    msg = f"invalid {what} {path!r}: {prefix or 'the model'!s} has no child {part!r}. "
    msg += f"Valid children of {prefix or 'the model'}: {shown or '(none)'}"
    if close:
        msg += f"; closest module names: {', '.join(close)}"
    return ValueError(msg)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` (``Inserted`` wrappers crossed transparently); ValueError if none."""
    mod, _, _, _ = _walk(model, path)
    if mod is None:
        raise _path_error(model, path)
    return mod


def _canonical(model: nn.Module, path: str) -> str:
    mod, canon, _, _ = _walk(model, path)
    if mod is None:
        raise _path_error(model, path)
    return canon


# ------------------------------------------------------------------------------------------ placements


def _container_path(model: nn.Module, spec: Mapping) -> str:
    info = model_feature_info(model)
    if spec.get("stage") is not None:
        k = int_key(spec, "stage")
        candidates = [f"stage{k}", f"layer{k}", f"stages.{k - 1}", f"layers.{k - 1}"]
    else:
        r = int_key(spec, "res")
        candidates = [f"layer{r - 1}", f"stage{r - 1}"]
    for c in candidates:
        if _walk(model, c)[0] is not None:
            return c
    if spec.get("res") is not None and info:
        found = [d["module"] for d in info if d.get("reduction") == 2**r]
        if len(found) == 1 and _walk(model, found[0])[0] is not None:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"placement {dict(spec)}: res{r} is ambiguous in this model: its feature_info lists "
                f"{len(found)} modules at reduction {2**r} ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''})"
                "; give 'at' instead")
        candidates.append(f"the feature_info module at reduction {2**r}")
    top = ", ".join(n for n, _ in model.named_children())
    listed = ", ".join(f"{d['module']}: {d.get('reduction')}" for d in info)
    stages = f"; the model's feature_info (module: reduction): {listed}" if info else ""
    raise ValueError(
        f"placement {dict(spec)} refers to {' or '.join(map(repr, candidates))}, which the model does "
        f"not have; top-level modules: {top}{stages}"
    )


def resolve_placement(model: nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Normalize a placement dict and resolve named positions to a module path.

    Returns a dict with keys ``at`` (canonical dotted path, ``.module`` inserted after existing wrappers),
    ``where``, ``block`` (``None`` if not given), ``units``, ``count``, ``dim`` (``None`` = infer),
    ``in_channels`` (``None`` = infer) and ``options``. Raises ValueError for unknown keys, bad values and
    paths that do not exist (the message lists nearby valid module names).
    """
    checked = check_placement(spec)
    where = checked["where"]
    positions = [k for k in POSITION_KEYS if spec.get(k) not in (None, False)]

    if spec.get("at") is not None:
        container = spec["at"]
    else:
        container = _container_path(model, spec)
    path = container
    if positions:
        key = positions[0]
        parent = get_module(model, container)
        if isinstance(parent, Inserted):
            parent = parent.module
        children = [n for n, m in parent.named_children() if m is not None]
        if not children:
            raise ValueError(f"placement {dict(spec)}: {container!r} has no child modules to choose from")
        if key.endswith("_last"):
            j = len(children)
        else:
            j = int_key(spec, key)
            if j > len(children):
                raise ValueError(
                    f"placement {dict(spec)}: {container!r} has only {len(children)} blocks "
                    f"({', '.join(f'{container}.{c}' for c in children)}); {key}={j} is out of range"
                )
        path = f"{container}.{children[j - 1]}"

    return {
        "at": _canonical(model, path),
        "where": where or "after",
        "block": spec.get("block"),
        "units": int_key(spec, "units", 1),
        "count": int_key(spec, "count", 1),
        "dim": spec.get("dim"),
        "in_channels": spec.get("in_channels"),
        "options": dict(spec.get("options") or {}),
        "layout": spec.get("layout"),
        "grid": list(spec["grid"]) if spec.get("grid") is not None else None,
        "prefix_tokens": spec.get("prefix_tokens"),
    }


# ---------------------------------------------------------------------------------------- dry forward


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def default_input_shape(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """``(per-sample input shape, where it comes from)`` as the model says it, or None: its
    ``dry_run_input_shape`` (the models of this package), a timm patch embedding's ``img_size``, timm's
    ``pretrained_cfg["input_size"]``, torchvision's ``VisionTransformer.image_size``."""
    shape = getattr(model, "dry_run_input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape), "model.dry_run_input_shape"
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if img is not None and isinstance(proj, nn.Conv2d):
        return (proj.in_channels, *(int(s) for s in img)), "the model's patch_embed.img_size (timm)"
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"]), "the model's pretrained_cfg['input_size'] (timm)"
    if type(model).__name__ == "VisionTransformer" and isinstance(getattr(model, "image_size", None), int):
        return (3, model.image_size, model.image_size), "the model's image_size (torchvision VisionTransformer)"
    return None


def _guess_input_shape(model: nn.Module) -> tuple[tuple[int, ...], str]:
    said = default_input_shape(model)
    if said is not None:
        return said
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nd = len(m.kernel_size)
            spatial = {1: (64,), 2: (64, 64), 3: (4, 32, 32)}[nd]
            return (m.in_channels, *spatial), f"a guess from the model's first {type(m).__name__} ({m.in_channels} " \
                f"input channels; the spatial size {spatial} is a default)"
    raise ValueError(
        "cannot guess an input shape for the dry forward pass that infers channel counts: "
        "pass example_input=<tensor> or input_shape=(C, *spatial) to insert_blocks"
    )


class _NotATensor(ValueError):
    """A target's input/output is not a tensor (raised from a hook during the dry forward)."""


def _record_shapes(
    model: nn.Module,
    targets: Sequence[tuple[str, str]],
    example_input: Any,
    input_shape: Sequence[int] | None,
) -> dict[tuple[str, str], tuple[int, ...]]:
    """Dry forward pass; ``{(path, where): shape}`` of the tensor seen at each target."""
    seen: dict[tuple[str, str], list[tuple[int, ...]]] = {t: [] for t in targets}
    handles = []

    def record(key, t):
        if not isinstance(t, torch.Tensor):
            raise _NotATensor(
                f"the {'output' if key[1] == 'after' else 'input'} of {key[0]!r} is a "
                f"{type(t).__name__}, not a tensor; a nonlocal block cannot be placed {key[1]} it"
            )
        seen[key].append(tuple(t.shape))

    for path, where in set(targets):
        mod = get_module(model, path)
        key = (path, where)
        if where == "after":
            handles.append(mod.register_forward_hook(lambda m, a, out, key=key: record(key, out)))
        else:
            handles.append(
                mod.register_forward_pre_hook(lambda m, a, key=key: record(key, a[0] if a else None))
            )
    device, dtype = _model_device_dtype(model)
    if example_input is None:
        if input_shape is not None:
            shape, source = tuple(input_shape), "input_shape"
        else:
            shape, source = _guess_input_shape(model)
        example_input = torch.zeros((2, *shape), device=device, dtype=dtype)
        tried = f"an input of shape (2, {', '.join(map(str, shape))}) ({source})"
    else:
        shapes = [tuple(t.shape) for t in (example_input if isinstance(example_input, tuple | list)
                                           else [example_input]) if isinstance(t, torch.Tensor)]
        tried = f"example_input of shape {', '.join(map(str, shapes))}"
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, tuple | list):
                model(*example_input)
            else:
                model(example_input)
    except _NotATensor:
        raise
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
        raise _dry_run_error(tried, e) from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    out = {}
    for key, shapes in seen.items():
        path, where = key
        if not shapes:
            raise ValueError(
                f"module {path!r} was not called during the dry forward pass; cannot place a block there"
            )
        if len(set(shapes)) != 1:
            raise ValueError(
                f"module {path!r} sees tensors of shapes {sorted(set(shapes))} ({where} it) during the dry "
                "forward pass; a nonlocal block needs one shape there — choose another path"
            )
        out[key] = shapes[0]
    return out


def _dry_run_error(tried: str, e: Exception) -> ValueError:
    return ValueError(
        f"the dry forward pass that infers the blocks' channels failed on {tried}: {type(e).__name__}: {e}. "
        "Set the input shape with insert_blocks(..., input_shape=(C, *spatial)) or example_input=... (in a config "
        "it is the data's shape: data.size, or the dataset's own)")


# ------------------------------------------------------------------------------------------- insertion


def _set_child(model: nn.Module, canonical_path: str, new: nn.Module) -> None:
    parent_path, _, name = canonical_path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if isinstance(parent, Inserted) and name not in parent._modules:
        parent = parent.module  # the path crosses a wrapper transparently
    parent._modules[name] = new  # works for Sequential / ModuleList / ModuleDict / plain attributes


def insert_blocks(
    model: nn.Module,
    placements: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    factory: Callable[..., nn.Module] | None = None,
    example_input: Any = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Insert nonlocal blocks in place and return ``model``.

    Args:
        model: any ``nn.Module``.
        placements: one placement dict or a list of them (see the module docstring).
        factory: ``factory(name, in_channels, dim=..., **options) -> nn.Module`` (shape preserving);
            default ``nonlocalnet.build_block``. ``units=n`` is added to the options when n > 1.
        example_input: input for the dry forward pass that infers channels (a tensor, or a tuple of
            positional arguments). Default: zeros of shape ``(2, *input_shape)``.
        input_shape: per-sample input shape, e.g. ``(3, 32, 32)``; default: what the model says
            (:func:`default_input_shape`: ``model.dry_run_input_shape`` of this package's models, timm's
            ``pretrained_cfg["input_size"]``, ...), else a guess from the first convolution (``(C, 64, 64)`` for
            2-D); when the dry forward fails, the error names the shape it tried and where it came from.

    All placements are validated, and all blocks built, before the model is modified. Several placements
    at the same path nest: the later one wraps the earlier one (``<at>.module.module.*``).
    """
    if isinstance(placements, Mapping):
        placements = [placements]
    resolved = [resolve_placement(model, p) for p in placements]
    for p, raw in zip(resolved, placements):
        if p["block"] is None:
            raise ValueError(f"placement {dict(raw)} lacks the 'block' key (the block name)")
    # the dry forward infers what the placements leave open, and checks what they state where the input is known
    verify = example_input is not None or input_shape is not None
    targets = [(p["at"], p["where"]) for p in resolved if verify or _needs_dry_run(p)]
    shapes = _record_shapes(model, targets, example_input, input_shape) if targets else {}
    if factory is None:
        factory = build_block
    device, dtype = _model_device_dtype(model)

    wrappers = []
    for p in resolved:
        key = (p["at"], p["where"])
        if key in shapes:
            layout = feature_layout(model, get_module(model, p["at"]), p["at"], shapes[key], p, p["where"])
        elif p["layout"] == "tokens":
            layout = Layout("tokens", p["in_channels"], tuple(p["grid"]), p["prefix_tokens"], "the placement")
        else:
            layout = Layout(p["layout"] or "channels_first", p["in_channels"], (1,) * p["dim"], 0, "the placement")
        channels, rank = layout.channels, layout.dim
        if p["in_channels"] is not None and p["in_channels"] != channels:
            raise ValueError(
                f"placement at {p['at']!r}: in_channels={p['in_channels']} but the tensor has {channels} "
                f"({layout.kind} features, shape {shapes.get(key)}, layout from {layout.source})"
            )
        if p["dim"] is not None and p["dim"] != rank:
            raise ValueError(
                f"placement at {p['at']!r}: dim={p['dim']} but the tensor {p['where']} it has "
                f"{rank} spatial dims ({layout.kind} features, shape {shapes.get(key)}, layout from {layout.source})"
            )
        if key in shapes:
            check_stated_layout(model, get_module(model, p["at"]), p["at"], shapes[key], p, p["where"], layout)
        p["in_channels"], p["dim"], p["layout"] = channels, rank, layout.kind
        if layout.kind == "tokens":
            p["grid"], p["prefix_tokens"] = list(layout.spatial), layout.prefix
        p["_layout"] = layout
        options = dict(p["options"])
        if p["units"] != 1:
            options["units"] = p["units"]
        blocks = [factory(p["block"], channels, dim=rank, **options) for _ in range(p["count"])]
        block = blocks[0] if p["count"] == 1 else BlockChain(*blocks)
        target = get_module(model, p["at"])
        block.to(device=device, dtype=dtype)
        block.train(target.training)
        wrappers.append((p, block))

    for p, block in wrappers:
        target = get_module(model, p["at"])
        layout = p.pop("_layout")
        _set_child(model, p["at"], Inserted(target, block, p["where"], placement=p, layout=layout))
    return model


def _needs_dry_run(p: dict[str, Any]) -> bool:
    if p["layout"] == "tokens":
        return p["in_channels"] is None or p["grid"] is None or p["prefix_tokens"] is None
    return p["in_channels"] is None or p["dim"] is None


def strip_blocks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every inserted block taken out (each :class:`Inserted` replaced by the module
    it wraps): the backbone the blocks were inserted into, with its weights. ``model`` is left untouched."""
    out = copy.deepcopy(model)
    while isinstance(out, Inserted):
        out = out.module
    _strip(out)
    return out


def _strip(module: nn.Module) -> None:
    for name, child in module._modules.items():
        while isinstance(child, Inserted):
            child = child.module
        module._modules[name] = child
        if child is not None:
            _strip(child)


def inserted_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{state-dict prefix: block}`` for every inserted block (chains listed block by block)."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, Inserted):
            prefix = f"{name}.nonlocal_block" if name else "nonlocal_block"
            if isinstance(m.nonlocal_block, BlockChain):
                out.update({f"{prefix}.{i}": b for i, b in enumerate(m.nonlocal_block)})
            else:
                out[prefix] = m.nonlocal_block
    return out


def _original_key(model: nn.Module, key: str) -> str | None:
    """Key ``key`` of ``model`` (with insertions) as it was before insertion; None for inserted blocks."""
    cur: nn.Module | None = model
    parts: list[str] = []
    for part in key.split("."):
        if isinstance(cur, Inserted):
            if part == "nonlocal_block":
                return None
            if part == "module":
                cur = cur.module
                continue
        parts.append(part)
        cur = cur._modules.get(part) if cur is not None else None
    return ".".join(parts)


def remap_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a state dict saved *before* insertion to ``model``'s names (``<at>.module.*``).

    Keys the model does not have are passed through unchanged (``load_state_dict`` then reports them).
    """
    mapping = {}
    for key in model.state_dict():
        orig = _original_key(model, key)
        if orig is not None:
            mapping[orig] = key
    return {mapping.get(k, k): v for k, v in state_dict.items()}
