"""Bring trained weights from public nonlocal implementations into our blocks.

- :func:`from_official_snl` — the SNL authors' ``Stage`` (classification part of the SNL_ICCV2021 code of
  L. Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, arXiv:2108.02451): a shared
  affinity from ``t``/``p`` and ``n`` SNL, NS or NL units ``stages.{i}.*``.
- :func:`from_mmcv` — OpenMMLab's ``NonLocal1d/2d/3d`` in its four modes, ``CrissCrossAttention`` (CCNet) and
  ``ContextBlock`` (GCNet), as mmsegmentation / mmdetection checkpoints hold them.
- :func:`from_cgnl` — the CGNL authors' ``SpatialCGNL`` (dot product) and ``SpatialCGNLx`` (Gaussian RBF, Taylor).
- :func:`from_timm` — timm's ``NonLocalAttn``, and (``module="GlobalContext"``) its ``GlobalContext`` (GCNet).
- :func:`from_efficient_attention` — the Efficient Attention authors' ``EfficientAttention`` (one head).
- :func:`from_external_attention` — the External Attention authors' ``External_attention`` (their final ReLU after
  the residual applied by the caller).
- :func:`from_mmseg_dnl` — mmsegmentation's ``DisentangledNonLocal2d`` (``DNLHead``'s block).
- :func:`from_official_dnl` — the DNL authors' ``NonLocal2d_bn`` (with the learnable scale of the pairwise term).

Each returns a block built with :func:`nonlocalnet.build_block` whose output equals the original module's,
in eval and in train mode (BatchNorm batch statistics and running-stat updates included). Only the
layouts and formulas recorded in docs/framework.md ("The code behind the papers' numbers") are used; no code
of those projects. docs/compat.md has the key mappings and the one flag combination that our affinities
cannot express (the official ``is_norm=True, is_sys=False``).

The returned block takes the dtype and device of the checkpoint's weights, and is in training mode like
any new ``nn.Module``: call ``.eval()`` for inference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .presets import build_block

__all__ = ["from_official_snl", "from_mmcv", "from_cgnl", "from_timm", "from_efficient_attention",
           "from_external_attention", "OFFICIAL_UNITS", "MMCV_MODES", "MMCV_MODULES", "CGNL_KERNELS", "from_mmseg_dnl",
           "MMSEG_DNL_MODES", "from_official_dnl", "TIMM_MODULES"]

OFFICIAL_UNITS = ("snl", "ns", "nl")
MMCV_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
MMCV_MODULES = ("NonLocal", "CrissCrossAttention", "ContextBlock")
CGNL_KERNELS = ("dot_product", "gaussian")
MMSEG_DNL_MODES = ("embedded_gaussian", "dot_product")
TIMM_MODULES = ("NonLocalAttn", "GlobalContext")

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_BN_OPTIONAL = ("num_batches_tracked",)  # absent from very old checkpoints; the block then keeps 0
_MAX_LISTED = 40


# --------------------------------------------------------------------------------------- helpers
def _fmt_keys(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(keys) > _MAX_LISTED else ''}]" + (
        f" ({len(keys)} keys)" if len(keys) > _MAX_LISTED else "")


def _select(state_dict: Any, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (prefix stripped); an ``nn.Module`` stands for its state dict."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of str to tensors (a state dict), "
                        f"got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}
    if not sd:
        where = f" under prefix {prefix!r}" if prefix else ""
        sample = _fmt_keys(list(state_dict)[:5])
        raise ValueError(f"{what}: the state dict has no keys{where} (it has {len(state_dict)} keys, "
                         f"first ones: {sample})")
    not_tensors = [prefix + k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{what}: expected tensors, got other values for keys {_fmt_keys(not_tensors)}")
    nonfinite = [prefix + k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{what}: the state dict holds NaN or inf values in {_fmt_keys(nonfinite)}; a block "
                         "converted from it would output NaN (was the checkpoint saved after training diverged?)")
    return sd


def _check_keys(sd: Mapping[str, torch.Tensor], required: list[str], optional: list[str], what: str,
                prefix: str, hints: list[str]) -> None:
    missing = [k for k in required if k not in sd]
    extra = sorted(set(sd) - set(required) - set(optional))
    if not (missing or extra):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_fmt_keys(prefix + k for k in missing)}")
    if extra:
        parts.append(f"unexpected keys {_fmt_keys(prefix + k for k in extra)}")
    expected = [prefix + k for k in required] + [prefix + k + " (optional)" for k in optional]
    msg = f"{what}: the state dict does not fit: {'; '.join(parts)}. Expected keys: {_fmt_keys(expected)}."
    if hints:
        msg += " " + " ".join(hints)
    raise ValueError(msg)


def _check_dtypes(sd: Mapping[str, torch.Tensor], what: str, prefix: str) -> None:
    """One floating dtype for every weight (BatchNorm's counters are integers): nothing is cast silently."""
    counters = [k for k in sd if k.endswith(_BN_OPTIONAL)]  # integer by nature
    not_float = [prefix + k for k, v in sd.items() if k not in counters and not v.is_floating_point()]
    if not_float:
        raise ValueError(f"{what}: weights must be floating-point tensors; {_fmt_keys(not_float)} "
                         f"{'is' if len(not_float) == 1 else 'are'} {sd[not_float[0][len(prefix):]].dtype} (converting "
                         "them would silently change what they hold)")
    dtypes = {v.dtype for k, v in sd.items() if k not in counters}
    if len(dtypes) > 1:
        key0 = next(k for k in sd if k not in counters)
        first = sd[key0].dtype
        odd = [prefix + k for k, v in sd.items() if k not in counters and v.dtype != first]
        raise ValueError(f"{what}: the weights mix dtypes ({', '.join(sorted(map(str, dtypes)))}): "
                         f"{_fmt_keys(odd)} {'is' if len(odd) == 1 else 'are'} {sd[odd[0][len(prefix):]].dtype} but "
                         f"{prefix + key0!r} is {first}; a block has one dtype: convert the state dict first, e.g. "
                         "{k: v.float() for k, v in state_dict.items()}")


def _check_shapes(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...] | list[tuple[int, ...]]],
                  what: str, prefix: str, context: str) -> None:
    bad = []
    for key, shapes in expected.items():
        if key not in sd:
            continue
        options = shapes if isinstance(shapes, list) else [shapes]
        got = tuple(sd[key].shape)
        if got not in [tuple(s) for s in options]:
            want = " or ".join(str(tuple(s)) for s in options)
            bad.append(f"{prefix + key!r} has shape {got}, expected {want}")
    if bad:
        raise ValueError(f"{what}: wrong shapes ({context}): " + "; ".join(bad))


def _conv1x1(sd: Mapping[str, torch.Tensor], key: str, what: str, prefix: str) -> tuple[int, int, int]:
    """``(C_out, C_in, dim)`` of a 1×1 convolution weight ``(C_out, C_in, 1[, 1[, 1]])``."""
    w = sd[key]
    if w.dim() not in (3, 4, 5) or any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"{what}: {prefix + key!r} has shape {tuple(w.shape)}, expected a 1x1 convolution weight "
                         f"(C_out, C_in, 1), (C_out, C_in, 1, 1) or (C_out, C_in, 1, 1, 1)")
    return int(w.shape[0]), int(w.shape[1]), w.dim() - 2


def _reduction(c: int, cs: int, key: str, what: str) -> int:
    """The ``reduction`` with ``C // reduction == C_s`` (our blocks derive ``C_s`` that way)."""
    if not 1 <= cs <= c:
        raise ValueError(f"{what}: {key!r} gives C_s = {cs} for C = {c}; expected 1 <= C_s <= C")
    r = c // cs
    if c // r != cs:
        raise ValueError(f"{what}: {key!r} gives C_s = {cs} for C = {c}, which is not C // reduction for any "
                         f"integer reduction (C // {r} = {c // r}, C // {r + 1} = {c // (r + 1)}); "
                         f"nonlocalnet blocks derive C_s = C // reduction")
    return r


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def _load(block: nn.Module, ours: dict[str, torch.Tensor], like: torch.Tensor, sd: Mapping[str, torch.Tensor],
          what: str, prefix: str) -> nn.Module:
    """Load ``ours`` (all parameters; BatchNorm counters optional) into ``block``, on ``like``'s dtype/device,
    after checking that the user's state dict ``sd`` holds one floating dtype (:func:`_check_dtypes`)."""
    _check_dtypes(sd, what, prefix)
    block = block.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
    full = block.state_dict()
    unknown = sorted(set(ours) - set(full))
    if unknown:  # a bug in this module, not in the user's state dict
        raise RuntimeError(f"compat: internal key mapping produced unknown keys {unknown}")
    left = [k for k in full if k not in ours and not k.endswith("num_batches_tracked")]
    if left:
        raise RuntimeError(f"compat: internal key mapping left parameters unset: {left}")
    full.update({k: v.detach() for k, v in ours.items()})
    block.load_state_dict(full, strict=True)
    return block


def _bn(sd: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {f"{dst}.{n}": sd[f"{src}.{n}"] for n in _BN_KEYS}
    for n in _BN_OPTIONAL:
        if f"{src}.{n}" in sd:
            out[f"{dst}.{n}"] = sd[f"{src}.{n}"]
    return out


# --------------------------------------------------------------------------------------- official SNL
def from_official_snl(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, unit: str = "snl",
                      normalized: bool = True, symmetric: bool = True, prefix: str = "") -> nn.Module:
    """A block equal to the SNL authors' ``Stage`` with ``is_norm=normalized, is_sys=symmetric``.

    Keys (docs/framework.md): ``t.weight``, ``p.weight`` (θ, φ; no bias) and per unit ``i``
    ``stages.{i}.g.weight``, ``stages.{i}.w_1.weight`` (``unit="snl"`` only), ``stages.{i}.w_2.weight``,
    ``stages.{i}.bn.{weight,bias,running_mean,running_var[,num_batches_tracked]}``. The number of units,
    ``C``, ``C_s`` and ``dim`` (from the weights' rank: 4-D → 2-D block) are inferred. ``prefix``: keys are
    read under it (e.g. ``"layer3.1.snl."`` in a whole-model checkpoint); other keys are ignored.

    - ``normalized=True, symmetric=True`` (what the authors' models use): ``relu_dot`` + ``symmetric``.
    - ``normalized=False, symmetric=False``: ``embedded_gaussian`` + ``softmax``, no scaling.
    - ``normalized=False, symmetric=True`` (softmax of ``(S + Sᵀ)/2``, ``S = θφᵀ``): exact through
      ``(S + Sᵀ)/2 = ½ [θ, φ][φ, θ]ᵀ``: θ' = ``[θ; φ; 0]``, φ' = ``[φ; θ; 0]`` (zero rows pad to
      ``C // reduction``), ``scale=0.5``. Needs ``C >= 2 C_s``. The two copies of θ and φ are separate
      parameters in the converted block: same function, but fine-tuning may untie them.
    - ``normalized=True, symmetric=False`` (``A = D^{-1/2} M D^{-1/2}`` with ``M`` not symmetrized):
      not expressible by our normalizations; raises :class:`NotImplementedError`.

    Units map to our filters: SNL ``w_1(Z) + w_2(AZ)`` → ``snl`` (``w.0 = w_1``, ``w.1 = w_2``);
    NS ``w_2(Z) − w_2(AZ)`` → ``ns``, which computes ``W(AZ − Z)``, so ``w.0 = −w_2``; NL ``w_2(AZ)`` →
    ``nl``. Output ``X + relu(BN(F))`` → ``out_norm="bn_relu"``.
    """
    if unit not in OFFICIAL_UNITS:
        raise ValueError(f"unit: expected one of {', '.join(map(repr, OFFICIAL_UNITS))}, got {unit!r}")
    _bool("normalized", normalized)
    _bool("symmetric", symmetric)
    what = f"from_official_snl(unit={unit!r}, normalized={normalized}, symmetric={symmetric})"
    if normalized and not symmetric:
        raise NotImplementedError(
            f"{what}: the official is_norm=True, is_sys=False affinity A = D^-1/2 M D^-1/2 with "
            "M = relu(θ) relu(φ)ᵀ not symmetrized and D = diag(M 1) is not one of nonlocalnet's "
            "normalizations ('symmetric' symmetrizes M first, 'row' gives D^-1 M); its authors' models all use "
            "is_norm=True, is_sys=True (normalized=True, symmetric=True)")
    sd = _select(state_dict, prefix, what)

    indices = {int(m.group(1)) for k in sd if (m := re.match(r"stages\.(\d+)\.", k))}
    if not indices:
        raise ValueError(f"{what}: no units found: expected keys 'stages.{{i}}.*' ({prefix}stages.0.g.weight, "
                         f"...) next to {prefix}t.weight and {prefix}p.weight; "
                         f"got keys {_fmt_keys(prefix + k for k in sd)}")
    n_units = max(indices) + 1
    unit_keys = ["g.weight"] + (["w_1.weight"] if unit == "snl" else []) + ["w_2.weight"] + \
        [f"bn.{n}" for n in _BN_KEYS]
    required = ["t.weight", "p.weight"] + [f"stages.{i}.{k}" for i in range(n_units) for k in unit_keys]
    optional = [f"stages.{i}.bn.{n}" for i in range(n_units) for n in _BN_OPTIONAL]
    hints = []
    if unit != "snl" and any(re.fullmatch(r"stages\.\d+\.w_1\.weight", k) for k in sd):
        hints.append("Keys 'stages.{i}.w_1.weight' belong to SNL units: pass unit='snl'.")
    if unit == "snl" and not any(re.fullmatch(r"stages\.\d+\.w_1\.weight", k) for k in sd):
        hints.append("No 'stages.{i}.w_1.weight': NS and NL units have only w_2; pass unit='ns' or unit='nl'.")
    _check_keys(sd, required, optional, what, prefix, hints)

    cs, c, dim = _conv1x1(sd, "t.weight", what, prefix)
    cv = _conv1x1(sd, "stages.0.g.weight", what, prefix)[0]
    ones = (1,) * dim
    shapes: dict[str, Any] = {"p.weight": (cs, c, *ones)}
    for i in range(n_units):
        shapes[f"stages.{i}.g.weight"] = (cv, c, *ones)
        for w in ("w_1", "w_2") if unit == "snl" else ("w_2",):
            shapes[f"stages.{i}.{w}.weight"] = (c, cv, *ones)
        shapes.update({f"stages.{i}.bn.{n}": (c,) for n in _BN_KEYS})
        shapes[f"stages.{i}.bn.num_batches_tracked"] = ()
    _check_shapes(sd, shapes, what, prefix, f"inferred from {prefix}t.weight {tuple(sd['t.weight'].shape)}: "
                  f"C = {c}, C_s = {cs}, dim = {dim}; from {prefix}stages.0.g.weight: C_v = {cv}")

    t, p = sd["t.weight"], sd["p.weight"]
    if normalized:  # and symmetric
        opts: dict[str, Any] = dict(kernel="relu_dot", normalization="symmetric", scale=False,
                                    reduction=_reduction(c, cs, prefix + "t.weight", what))
        theta, phi = t, p
    elif not symmetric:
        opts = dict(kernel="embedded_gaussian", normalization="softmax", scale=False,
                    reduction=_reduction(c, cs, prefix + "t.weight", what))
        theta, phi = t, p
    else:
        if 2 * cs > c:
            raise NotImplementedError(
                f"{what}: softmax((S + Sᵀ)/2) is converted as an embedded Gaussian on stacked projections "
                f"[θ; φ] and [φ; θ] (2 C_s = {2 * cs} key channels), which needs C >= 2 C_s; here C = {c}")
        r = c // (2 * cs)
        pad = t.new_zeros((c // r - 2 * cs, *t.shape[1:]))
        theta, phi = torch.cat([t, p, pad]), torch.cat([p, t, pad])
        opts = dict(kernel="embedded_gaussian", normalization="softmax", scale=0.5, reduction=r)

    block = build_block(unit, c, dim=dim, units=n_units, bias=False, out_norm="bn_relu", zero_init=False,
                        value_channels=cv, **opts)
    ours = {"edges.theta.weight": theta, "edges.phi.weight": phi}
    for i in range(n_units):
        s, u = f"stages.{i}", f"units.{i}"
        ours[f"{u}.g.weight"] = sd[f"{s}.g.weight"]
        if unit == "snl":
            ours[f"{u}.w.0.weight"] = sd[f"{s}.w_1.weight"]
            ours[f"{u}.w.1.weight"] = sd[f"{s}.w_2.weight"]
        elif unit == "ns":
            ours[f"{u}.w.0.weight"] = -sd[f"{s}.w_2.weight"]
        else:
            ours[f"{u}.w.0.weight"] = sd[f"{s}.w_2.weight"]
        ours.update(_bn(sd, f"{s}.bn", f"{u}.norm.bn"))
    return _load(block, ours, t, sd, what, prefix)


# --------------------------------------------------------------------------------------- mmcv
# mmcv's ``conv_out`` ConvModule (NonLocal's and mmseg's DNL block's): a 1x1 conv, then the norm of ``norm_cfg``
def _conv_out_norm(sd: Mapping[str, torch.Tensor], what: str, prefix: str, gn_groups: int | None) -> str:
    """``"bn"``, ``"gn"`` or ``"none"``: the norm after ``conv_out``, read from the keys (``gn_groups`` checked)."""
    has_bn = any(k.startswith("conv_out.bn.") for k in sd)
    has_gn = any(k.startswith("conv_out.gn.") for k in sd)
    if has_bn and has_gn:
        bn_keys = _fmt_keys(prefix + k for k in sd if k.startswith("conv_out.bn."))
        gn_keys = _fmt_keys(prefix + k for k in sd if k.startswith("conv_out.gn."))
        raise ValueError(f"{what}: both BatchNorm keys {bn_keys} and GroupNorm keys {gn_keys} after conv_out; "
                         f"expected at most one norm")
    norm = "bn" if has_bn else "gn" if has_gn else "none"
    if norm == "gn" and (isinstance(gn_groups, bool) or not isinstance(gn_groups, int) or gn_groups < 1):
        raise ValueError(f"{what}: the state dict has a GroupNorm after conv_out (keys 'conv_out.gn.*'); its "
                         f"number of groups is not stored in a state dict: pass gn_groups= (mmcv's "
                         f"norm_cfg num_groups), got gn_groups={gn_groups!r}")
    return norm


def _conv_out_keys(norm: str) -> tuple[list[str], list[str]]:
    """``(required, optional)`` keys of ``conv_out``: mmcv's ConvModule has no conv bias before a norm (one is
    accepted if present)."""
    required, optional = ["conv_out.conv.weight"], []
    (optional if norm != "none" else required).append("conv_out.conv.bias")
    if norm == "bn":
        required += [f"conv_out.bn.{n}" for n in _BN_KEYS]
        optional += [f"conv_out.bn.{n}" for n in _BN_OPTIONAL]
    elif norm == "gn":
        required += ["conv_out.gn.weight", "conv_out.gn.bias"]
    return required, optional


def _conv_out_shapes(norm: str, c: int) -> dict[str, Any]:
    """The shapes of ``conv_out``'s norm keys for ``C = c`` output channels."""
    if norm == "bn":
        return {**{f"conv_out.bn.{n}": (c,) for n in _BN_KEYS}, "conv_out.bn.num_batches_tracked": ()}
    if norm == "gn":
        return {"conv_out.gn.weight": (c,), "conv_out.gn.bias": (c,)}
    return {}


def _conv_out_state(sd: Mapping[str, torch.Tensor], norm: str, c: int) -> dict[str, torch.Tensor]:
    """``conv_out`` as our unit's output map ``units.0.w.0`` (a zero bias where mmcv has none) and norm."""
    w = sd["conv_out.conv.weight"]
    out = {"units.0.w.0.weight": w, "units.0.w.0.bias": sd.get("conv_out.conv.bias", w.new_zeros(c))}
    if norm == "bn":
        out.update(_bn(sd, "conv_out.bn", "units.0.norm.bn"))
    elif norm == "gn":
        out.update({"units.0.norm.gn.weight": sd["conv_out.gn.weight"], "units.0.norm.gn.bias": sd["conv_out.gn.bias"]})
    return out


def from_mmcv(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, mode: str | None = None, dim: int = 2,
              sub_sample: bool = False, use_scale: bool = True, gn_groups: int | None = None,
              prefix: str = "", module: str = "NonLocal", recurrence: int = 1) -> nn.Module:
    """A block equal to mmcv's ``NonLocal{dim}d(mode=mode, sub_sample=..., use_scale=...)``, or with
    ``module="CrissCrossAttention"`` / ``module="ContextBlock"`` to those modules (see :func:`_mmcv_criss_cross`,
    :func:`_mmcv_context_block`; ``mode``, ``sub_sample``, ``use_scale``, ``gn_groups`` are NonLocal's only).

    Keys (docs/framework.md): ``g.conv.{weight,bias}``, ``theta.conv.*`` and ``phi.conv.*`` (not in
    ``gaussian`` mode), ``conv_out.conv.weight`` (+ ``conv_out.conv.bias`` without a norm), the norm after
    ``conv_out`` if any (``conv_out.bn.*`` BatchNorm or ``conv_out.gn.*`` GroupNorm, detected from the
    keys; GroupNorm needs ``gn_groups``, which a state dict does not record), ``concat_project.conv.weight``
    (``concatenation`` mode). With ``sub_sample``, ``g`` and ``phi`` are ``Sequential(ConvModule, MaxPool)``:
    ``g.0.conv.*``, ``phi.0.conv.*``. ``C`` and ``C_s`` come from the shapes; ``dim`` must match the rank
    of the conv weights. ``prefix``: keys are read under it; other keys are ignored.

    Built as our ``nl`` preset with ``kernel=mode``, ``bias=True``, ``out_norm`` ``"none"``/``"bn"``/``"gn"``;
    normalization ``softmax`` (``embedded_gaussian`` scaled by ``1/sqrt(C_s)`` when ``use_scale``;
    ``gaussian`` never scaled, as in mmcv) or ``count`` (``dot_product``, ``concatenation``: ``/N'``).
    """
    if module not in MMCV_MODULES:
        raise ValueError(f"module: expected one of {', '.join(map(repr, MMCV_MODULES))} (mmcv's class), "
                         f"got {module!r}")
    if module != "NonLocal":
        if mode is not None:
            raise ValueError(f"mode: applies to module='NonLocal' (NonLocal1d/2d/3d), not module={module!r}")
        if module == "CrissCrossAttention":
            return _mmcv_criss_cross(state_dict, prefix, recurrence)
        return _mmcv_context_block(state_dict, prefix)
    if recurrence != 1:
        raise ValueError("recurrence: applies to module='CrissCrossAttention' (mmseg's CCHead), not NonLocal")
    if mode not in MMCV_MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MMCV_MODES))}, got {mode!r}")
    if isinstance(dim, bool) or dim not in (1, 2, 3):
        raise ValueError(f"dim: expected 1, 2 or 3 (NonLocal1d/2d/3d), got {dim!r}")
    _bool("sub_sample", sub_sample)
    _bool("use_scale", use_scale)
    what = f"from_mmcv(mode={mode!r}, dim={dim}, sub_sample={sub_sample})"
    sd = _select(state_dict, prefix, what)

    norm = _conv_out_norm(sd, what, prefix, gn_groups)

    g = "g.0.conv" if sub_sample else "g.conv"
    ph = "phi.0.conv" if sub_sample else "phi.conv"
    required = [f"{g}.weight", f"{g}.bias"]
    if mode != "gaussian":
        required += ["theta.conv.weight", "theta.conv.bias", f"{ph}.weight", f"{ph}.bias"]
    out_required, optional = _conv_out_keys(norm)
    required += out_required
    if mode == "concatenation":
        required.append("concat_project.conv.weight")
    hints = []
    if not sub_sample and any(k.startswith(("g.0.", "phi.0.")) for k in sd):
        hints.append("Keys 'g.0.conv.*' / 'phi.0.conv.*' are those of a sub-sampled block: pass sub_sample=True.")
    if sub_sample and any(k.startswith(("g.conv.", "phi.conv.")) for k in sd):
        hints.append("Keys 'g.conv.*' / 'phi.conv.*' are those of a block without sub-sampling: pass "
                     "sub_sample=False.")
    if mode == "gaussian" and any(k.startswith("theta.") for k in sd):
        hints.append("'gaussian' mode has no theta/phi (it uses the raw input): the keys say another mode.")
    if mode != "gaussian" and not any(k.startswith("theta.") for k in sd):
        hints.append("No theta/phi keys: is this a mode='gaussian' block?")
    if mode != "concatenation" and "concat_project.conv.weight" in sd:
        hints.append("'concat_project' belongs to mode='concatenation'.")
    _check_keys(sd, required, optional, what, prefix, hints)

    cs, c, wdim = _conv1x1(sd, f"{g}.weight", what, prefix)
    if wdim != dim:
        raise ValueError(f"{what}: {prefix}{g}.weight has shape {tuple(sd[g + '.weight'].shape)}, the weight of a "
                         f"{wdim}-D convolution (NonLocal{wdim}d); pass dim={wdim}")
    ones = (1,) * dim
    shapes: dict[str, Any] = {f"{g}.bias": (cs,), "conv_out.conv.weight": (c, cs, *ones),
                              "conv_out.conv.bias": (c,)}
    if mode != "gaussian":
        shapes.update({"theta.conv.weight": (cs, c, *ones), "theta.conv.bias": (cs,),
                       f"{ph}.weight": (cs, c, *ones), f"{ph}.bias": (cs,)})
    shapes.update(_conv_out_shapes(norm, c))
    if mode == "concatenation":  # mmcv's concat_project is a Conv2d for every dim
        shapes["concat_project.conv.weight"] = [(1, 2 * cs, 1, 1)] + ([(1, 2 * cs, *ones)] if dim != 2 else [])
    _check_shapes(sd, shapes, what, prefix, f"inferred from {prefix}{g}.weight {tuple(sd[g + '.weight'].shape)}: "
                  f"C = {c}, C_s = {cs}")
    if norm == "gn" and c % gn_groups:
        raise ValueError(f"{what}: gn_groups={gn_groups} does not divide C = {c}")

    r = _reduction(c, cs, prefix + g + ".weight", what)
    normalization = "softmax" if mode in ("embedded_gaussian", "gaussian") else "count"
    block = build_block("nl", c, dim=dim, reduction=r, kernel=mode, normalization=normalization,
                        scale=bool(use_scale and mode == "embedded_gaussian"), bias=True, sub_sample=sub_sample,
                        out_norm=norm, zero_init=False, **({"norm_groups": gn_groups} if norm == "gn" else {}))
    ours = {"units.0.g.weight": sd[f"{g}.weight"], "units.0.g.bias": sd[f"{g}.bias"], **_conv_out_state(sd, norm, c)}
    if mode != "gaussian":
        ours.update({"edges.theta.weight": sd["theta.conv.weight"], "edges.theta.bias": sd["theta.conv.bias"],
                     "edges.phi.weight": sd[f"{ph}.weight"], "edges.phi.bias": sd[f"{ph}.bias"]})
    if mode == "concatenation":
        ours["edges.concat.weight"] = sd["concat_project.conv.weight"].reshape(1, 2 * cs, *ones)
    return _load(block, ours, sd[f"{g}.weight"], sd, what, prefix)


def _shape_context(sd: Mapping[str, torch.Tensor], key: str, prefix: str, **inferred: int) -> str:
    values = ", ".join(f"{k} = {v}" for k, v in inferred.items())
    return f"inferred from {prefix}{key} {tuple(sd[key].shape)}: {values}"


# --------------------------------------------------------------------------------------- mmcv CC and GC
def _mmcv_criss_cross(state_dict: Any, prefix: str, recurrence: int) -> nn.Module:
    """mmcv's ``CrissCrossAttention`` (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation",
    ICCV 2019, arXiv 1811.11721): ``Y = X + γ·F``, ``F = A·value_conv(X)``, ``A`` the softmax of
    ``query·key`` over the pixel's row and column (itself counted once), no scaling.

    Keys: ``query_conv.{weight,bias}``, ``key_conv.*`` (``C_s×C×1×1``), ``value_conv.*`` (``C×C×1×1``),
    ``gamma.scale`` (mmcv's ``Scale``: a 0-d tensor; ``(1,)`` accepted). mmseg's ``CCHead`` applies the module
    ``recurrence`` times with shared weights (2 in its configs): pass ``recurrence=2`` for that.
    """
    if isinstance(recurrence, bool) or not isinstance(recurrence, int) or recurrence < 1:
        raise ValueError(f"recurrence: expected an int >= 1, got {recurrence!r}")
    what = "from_mmcv(module='CrissCrossAttention')"
    sd = _select(state_dict, prefix, what)
    required = [f"{m}.{p}" for m in ("query_conv", "key_conv", "value_conv") for p in ("weight", "bias")]
    required.append("gamma.scale")
    hints = ["A 'gamma' without '.scale' is an older layout (nn.Parameter): rename it 'gamma.scale'."] \
        if "gamma" in sd else []
    _check_keys(sd, required, [], what, prefix, hints)
    cs, c, dim = _conv1x1(sd, "query_conv.weight", what, prefix)
    ones = (1,) * dim
    _check_shapes(sd, {"query_conv.bias": (cs,), "key_conv.weight": (cs, c, *ones), "key_conv.bias": (cs,),
                       "value_conv.weight": (c, c, *ones), "value_conv.bias": (c,), "gamma.scale": [(), (1,)]},
                  what, prefix, _shape_context(sd, "query_conv.weight", prefix, C=c, C_s=cs, dim=dim))
    block = build_block("cc", c, dim=dim, key_channels=cs, recurrence=recurrence, bias=True, scale=False,
                        zero_init=False)
    ours = {"edges.theta.weight": sd["query_conv.weight"], "edges.theta.bias": sd["query_conv.bias"],
            "edges.phi.weight": sd["key_conv.weight"], "edges.phi.bias": sd["key_conv.bias"],
            "units.0.g.weight": sd["value_conv.weight"], "units.0.g.bias": sd["value_conv.bias"],
            "units.0.norm.gamma": sd["gamma.scale"].reshape(1)}
    return _load(block, ours, sd["query_conv.weight"], sd, what, prefix)


_GC_BRANCHES = {"channel_add": "w", "channel_mul": "w_mul"}


def _mmcv_context_block(state_dict: Any, prefix: str) -> nn.Module:
    """mmcv's ``ContextBlock`` (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
    Beyond", ICCVW 2019, arXiv 1904.11492): our ``gc`` preset.

    Keys: ``conv_mask.{weight,bias}`` (``1×C×1×1``; ``pooling_type="att"``, GCNet's default) and, per fusion type
    present (detected from the keys), ``channel_add_conv.{0,1,3}.{weight,bias}`` / ``channel_mul_conv.*``: conv
    ``C→P``, ``LayerNorm([P, 1, 1])``, ReLU, conv ``P→C``. ``P`` (``int(C·ratio)``) comes from the shapes.

    Without ``conv_mask.*`` the block is ``pooling_type="avg"``: the context is the mean over the positions,
    ``A = 11ᵀ/N`` — GC's graph with the logits ``m_j = 0``, since the softmax of equal logits is exactly ``1/N``.
    It is built as ``gc`` with the mask conv's weight and bias zero and frozen (``requires_grad=False``), so that
    training it keeps the mean, as mmcv's module has no mask to train (a state dict does not record the freeze:
    after loading one into a fresh ``gc`` block, call ``block.edges.mask.requires_grad_(False)``).
    """
    what = "from_mmcv(module='ContextBlock')"
    sd = _select(state_dict, prefix, what)
    present = [f for f in _GC_BRANCHES if any(k.startswith(f + "_conv.") for k in sd)]
    if not present:
        raise ValueError(f"{what}: no fusion branch: expected keys 'channel_add_conv.*' and/or 'channel_mul_conv.*'; "
                         f"got keys {_fmt_keys(prefix + k for k in sd)}")
    avg = "conv_mask.weight" not in sd and "conv_mask.bias" not in sd  # pooling_type="avg"
    required = [] if avg else ["conv_mask.weight", "conv_mask.bias"]
    required += [f"{f}_conv.{i}.{p}" for f in present for i in (0, 1, 3) for p in ("weight", "bias")]
    _check_keys(sd, required, [], what, prefix, [])
    first = f"{present[0]}_conv.0.weight"
    planes, c, dim = _conv1x1(sd, first, what, prefix)
    if not avg:
        one, c, dim = _conv1x1(sd, "conv_mask.weight", what, prefix)
        if one != 1:
            raise ValueError(f"{what}: {prefix}conv_mask.weight has shape {tuple(sd['conv_mask.weight'].shape)}, "
                             f"expected (1, C, 1, 1) (one attention logit per position)")
    ones = (1,) * dim
    shapes: dict[str, Any] = {} if avg else {"conv_mask.bias": (1,)}
    for f in present:
        shapes.update({f"{f}_conv.0.weight": (planes, c, *ones), f"{f}_conv.0.bias": (planes,),
                       f"{f}_conv.1.weight": [(planes, *ones), (planes,)], f"{f}_conv.1.bias": [(planes, *ones),
                                                                                               (planes,)],
                       f"{f}_conv.3.weight": (c, planes, *ones), f"{f}_conv.3.bias": (c,)})
    context = (_shape_context(sd, first, prefix, C=c, planes=planes, dim=dim) if avg else
               _shape_context(sd, "conv_mask.weight", prefix, C=c, dim=dim) + f"; from {prefix}{first}: planes = "
               f"{planes}")
    _check_shapes(sd, shapes, what, prefix, context)
    fusion = "add_mul" if len(present) == 2 else present[0].split("_")[1]
    block = build_block("gc", c, dim=dim, fusion=fusion, bottleneck_channels=planes, bias=True, zero_init=False)
    like = sd[first]
    ours = ({"edges.mask.weight": like.new_zeros(1, c, *ones), "edges.mask.bias": like.new_zeros(1)} if avg else
            {"edges.mask.weight": sd["conv_mask.weight"], "edges.mask.bias": sd["conv_mask.bias"]})
    for f in present:
        dst = f"units.0.{_GC_BRANCHES[f]}.0"
        ours.update({f"{dst}.conv1.weight": sd[f"{f}_conv.0.weight"], f"{dst}.conv1.bias": sd[f"{f}_conv.0.bias"],
                     f"{dst}.norm.weight": sd[f"{f}_conv.1.weight"].reshape(planes),
                     f"{dst}.norm.bias": sd[f"{f}_conv.1.bias"].reshape(planes),
                     f"{dst}.conv2.weight": sd[f"{f}_conv.3.weight"], f"{dst}.conv2.bias": sd[f"{f}_conv.3.bias"]})
    block = _load(block, ours, like, sd, what, prefix)
    if avg:  # the mean stays the mean under training: mmcv's avg-pooling block has no mask to learn
        block.edges.mask.requires_grad_(False)
    return block


# --------------------------------------------------------------------------------------- CGNL authors
def from_cgnl(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, kernel: str = "dot_product", order: int = 2,
              use_scale: bool = False, gamma: float = 1e-4, prefix: str = "") -> nn.Module:
    """A block equal to the CGNL authors' ``SpatialCGNL`` (``kernel="dot_product"``) or ``SpatialCGNLx``
    (``kernel="gaussian"``, Taylor ``order``, their default 2; their ResNets use 3) — Yue et al., "Compact
    Generalized Non-local Network", NeurIPS 2018 (arXiv 1810.13125).

    Keys: ``t.weight``, ``p.weight``, ``g.weight`` (``C_s×C×1×1``, no bias), ``z.weight`` (``C×C_s/G×1×1``,
    grouped), ``gn.{weight,bias}`` (GroupNorm with ``G`` groups). ``C``, ``C_s``, ``G`` come from the shapes
    (``G = C_s / z.weight.shape[1]``). ``use_scale`` (not in a state dict) divides by ``sqrt(N·C_g)``.

    ``SpatialCGNLx`` replaces the RBF's per-node prefactors ``exp(-γt²)exp(-γp²)`` by the constant ``exp(-2γ)``
    (``γ`` = ``gamma``, ``1e-4`` in their code): the block is built with ``rbf_prefactor="constant"``.
    """
    if kernel not in CGNL_KERNELS:
        raise ValueError(f"kernel: expected 'dot_product' (SpatialCGNL) or 'gaussian' (SpatialCGNLx), got {kernel!r}")
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order: expected an int >= 0 (the Taylor order of SpatialCGNLx), got {order!r}")
    _bool("use_scale", use_scale)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma: expected a positive number, got {gamma!r}")
    what = f"from_cgnl(kernel={kernel!r})"
    sd = _select(state_dict, prefix, what)
    required = ["t.weight", "p.weight", "g.weight", "z.weight", "gn.weight", "gn.bias"]
    hints = ["SpatialCGNL has no conv biases and a GroupNorm 'gn'; a 'bn' is SpatialNL (use from_timm or "
             "build_block('nl'))."] if any(k.startswith("bn.") for k in sd) else []
    _check_keys(sd, required, [], what, prefix, hints)
    cs, c, dim = _conv1x1(sd, "t.weight", what, prefix)
    cout, per_group, _ = _conv1x1(sd, "z.weight", what, prefix)
    if cout != c or per_group < 1 or cs % per_group:
        raise ValueError(f"{what}: {prefix}z.weight has shape {tuple(sd['z.weight'].shape)}, expected (C, C_s/G, "
                         f"1, 1) with C = {c} and G dividing C_s = {cs} (from {prefix}t.weight)")
    groups = cs // per_group
    if c % groups:
        raise ValueError(f"{what}: {groups} groups (from {prefix}z.weight) do not divide C = {c} (GroupNorm)")
    ones = (1,) * dim
    _check_shapes(sd, {"p.weight": (cs, c, *ones), "g.weight": (cs, c, *ones), "gn.weight": (c,), "gn.bias": (c,)},
                  what, prefix, _shape_context(sd, "t.weight", prefix, C=c, C_s=cs, dim=dim, G=groups))
    block = build_block("cgnl", c, dim=dim, key_channels=cs, groups=groups, kernel=kernel, taylor_order=order,
                        rbf_gamma=float(gamma), rbf_prefactor="constant", scale=use_scale, bias=False,
                        normalization="none", out_norm="gn", norm_groups=groups, zero_init=False)
    ours = {"edges.theta.weight": sd["t.weight"], "edges.phi.weight": sd["p.weight"],
            "units.0.g.weight": sd["g.weight"], "units.0.w.0.weight": sd["z.weight"],
            "units.0.norm.gn.weight": sd["gn.weight"], "units.0.norm.gn.bias": sd["gn.bias"]}
    return _load(block, ours, sd["t.weight"], sd, what, prefix)


# --------------------------------------------------------------------------------------- timm
def from_timm(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, use_scale: bool = True,
              prefix: str = "", module: str = "NonLocalAttn") -> nn.Module:
    """A block equal to timm's ``NonLocalAttn`` (Wang et al.'s NL as timm ships it), or with
    ``module="GlobalContext"`` to timm's ``GlobalContext`` (:func:`_timm_global_context`).

    Keys: ``t``, ``p``, ``g`` (``C_r×C×1×1`` convs with bias), ``z`` (``C×C_r×1×1`` with bias),
    ``norm.{weight,bias,running_mean,running_var[,num_batches_tracked]}`` (BatchNorm2d). ``C_r`` is timm's
    ``make_divisible(C·rd_ratio, 8)`` (``C = 72 → 16``), often not ``C // reduction``: the block is built with
    ``key_channels=C_r``. timm scales the logits by ``C**-0.5`` — the *input* width, not ``C_r`` — when
    ``use_scale`` (its default; not in a state dict): here ``scale=C**-0.5``.
    """
    if module not in TIMM_MODULES:
        raise ValueError(f"module: expected one of {', '.join(map(repr, TIMM_MODULES))}, got {module!r}")
    if module == "GlobalContext":
        return _timm_global_context(state_dict, prefix)
    _bool("use_scale", use_scale)
    what = "from_timm(NonLocalAttn)"
    sd = _select(state_dict, prefix, what)
    required = [f"{m}.{p}" for m in ("t", "p", "g", "z") for p in ("weight", "bias")] + \
        [f"norm.{n}" for n in _BN_KEYS]
    _check_keys(sd, required, [f"norm.{n}" for n in _BN_OPTIONAL], what, prefix, [])
    cr, c, dim = _conv1x1(sd, "t.weight", what, prefix)
    ones = (1,) * dim
    shapes: dict[str, Any] = {"t.bias": (cr,), "p.weight": (cr, c, *ones), "p.bias": (cr,),
                              "g.weight": (cr, c, *ones), "g.bias": (cr,), "z.weight": (c, cr, *ones), "z.bias": (c,),
                              "norm.num_batches_tracked": ()}
    shapes.update({f"norm.{n}": (c,) for n in _BN_KEYS})
    _check_shapes(sd, shapes, what, prefix, _shape_context(sd, "t.weight", prefix, C=c, C_r=cr, dim=dim))
    block = build_block("nl", c, dim=dim, key_channels=cr, kernel="embedded_gaussian", normalization="softmax",
                        scale=c ** -0.5 if use_scale else False, bias=True, out_norm="bn", zero_init=False)
    ours = {"edges.theta.weight": sd["t.weight"], "edges.theta.bias": sd["t.bias"],
            "edges.phi.weight": sd["p.weight"], "edges.phi.bias": sd["p.bias"],
            "units.0.g.weight": sd["g.weight"], "units.0.g.bias": sd["g.bias"],
            "units.0.w.0.weight": sd["z.weight"], "units.0.w.0.bias": sd["z.bias"]}
    ours.update(_bn(sd, "norm", "units.0.norm.bn"))
    return _load(block, ours, sd["t.weight"], sd, what, prefix)


# --------------------------------------------------------------------------------------- Efficient / External
def from_efficient_attention(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, head_count: int = 1,
                             prefix: str = "") -> nn.Module:
    """A block equal to the Efficient Attention authors' ``EfficientAttention(in_channels, key_channels, head_count,
    value_channels)`` (Shen, Zhang, Zhao, Yi, Li, "Efficient Attention: Attention with Linear Complexities", WACV
    2021; the cmsflash/efficient-attention module): our ``efficient`` preset.

    Keys: ``queries``, ``keys`` (``C_k×C×1×1`` with bias), ``values`` (``C_v×C×1×1``), ``reprojection``
    (``C×C_v×1×1``). ``head_count`` is a constructor argument, not in the state dict: with ``h`` heads, head ``i``
    takes the ``i``-th of ``h`` equal channel groups of the queries, keys and values, each softmaxed on its own
    (our ``heads=h``); it must divide ``C_k`` and ``C_v``.
    """
    if isinstance(head_count, bool) or not isinstance(head_count, int) or head_count < 1:
        raise ValueError(f"head_count: expected a positive int, got {head_count!r}")
    what = "from_efficient_attention(EfficientAttention)"
    sd = _select(state_dict, prefix, what)
    names = ("queries", "keys", "values", "reprojection")
    _check_keys(sd, [f"{m}.{p}" for m in names for p in ("weight", "bias")], [], what, prefix, [])
    ck, c, dim = _conv1x1(sd, "queries.weight", what, prefix)
    cv = int(sd["values.weight"].shape[0])
    ones = (1,) * dim
    shapes: dict[str, Any] = {"queries.bias": (ck,), "keys.weight": (ck, c, *ones), "keys.bias": (ck,),
                              "values.weight": (cv, c, *ones), "values.bias": (cv,),
                              "reprojection.weight": (c, cv, *ones), "reprojection.bias": (c,)}
    _check_shapes(sd, shapes, what, prefix, _shape_context(sd, "queries.weight", prefix, C=c, C_k=ck, dim=dim))
    if ck % head_count or cv % head_count:
        raise ValueError(f"{what}: head_count ({head_count}) must divide the key channels ({ck}) and the value "
                         f"channels ({cv}) of the state dict")
    block = build_block("efficient", c, dim=dim, key_channels=ck, value_channels=cv, bias=True,
                        **({"heads": head_count} if head_count > 1 else {}))
    ours = {"edges.theta.weight": sd["queries.weight"], "edges.theta.bias": sd["queries.bias"],
            "edges.phi.weight": sd["keys.weight"], "edges.phi.bias": sd["keys.bias"],
            "units.0.g.weight": sd["values.weight"], "units.0.g.bias": sd["values.bias"],
            "units.0.w.0.weight": sd["reprojection.weight"], "units.0.w.0.bias": sd["reprojection.bias"]}
    return _load(block, ours, sd["queries.weight"], sd, what, prefix)


def from_external_attention(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, prefix: str = "") -> nn.Module:
    """A block for the External Attention authors' ``External_attention(c)`` (Guo, Liu, Mu, Hu, "Beyond
    Self-attention: External Attention using Two Linear Layers for Visual Tasks", TPAMI 2022; the EANet module):
    our ``external`` preset, ``relu(block(x))`` equal to their output (their module ends with a ReLU after the
    residual sum, which is not part of our block: apply it after, as in the code that used theirs).

    Keys: ``conv1.{weight,bias}`` (``C×C×1×1``: the queries), ``linear_0.weight`` (``S×C×1``, ``M_k``),
    ``linear_1.weight`` (``C×S×1``, ``M_v``), ``conv2.0.weight`` (``C×C×1×1``, no bias) and the BatchNorm
    ``conv2.1.{weight,bias,running_mean,running_var[,num_batches_tracked]}``. ``S`` (their ``k = 64``) becomes
    ``memory_size``; the output map's bias (theirs has none) is 0.
    """
    what = "from_external_attention(External_attention)"
    sd = _select(state_dict, prefix, what)
    required = ["conv1.weight", "conv1.bias", "linear_0.weight", "linear_1.weight", "conv2.0.weight"] + \
        [f"conv2.1.{n}" for n in _BN_KEYS]
    _check_keys(sd, required, [f"conv2.1.{n}" for n in _BN_OPTIONAL], what, prefix, [])
    c, cin, dim = _conv1x1(sd, "conv1.weight", what, prefix)
    s = int(sd["linear_0.weight"].shape[0])
    ones = (1,) * dim
    shapes: dict[str, Any] = {"conv1.weight": (c, c, *ones), "conv1.bias": (c,), "linear_0.weight": (s, c, 1),
                              "linear_1.weight": (c, s, 1), "conv2.0.weight": (c, c, *ones),
                              "conv2.1.num_batches_tracked": ()}
    shapes.update({f"conv2.1.{n}": (c,) for n in _BN_KEYS})
    _check_shapes(sd, shapes, what, prefix, _shape_context(sd, "linear_0.weight", prefix, C=c, S=s, dim=dim))
    block = build_block("external", c, dim=dim, memory_size=s)
    w = sd["conv2.0.weight"]
    ours = {"edges.theta.weight": sd["conv1.weight"], "edges.theta.bias": sd["conv1.bias"],
            "edges.memory.weight": sd["linear_0.weight"].reshape(s, c, *ones),
            "units.0.memory.weight": sd["linear_1.weight"].reshape(c, s, *ones),
            "units.0.w.0.weight": w, "units.0.w.0.bias": torch.zeros(c, dtype=w.dtype, device=w.device)}
    ours.update(_bn(sd, "conv2.1", "units.0.norm.bn"))
    return _load(block, ours, w, sd, what, prefix)
# --------------------------------------------------------------------------------------- mmseg DNL
def from_mmseg_dnl(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, mode: str = "embedded_gaussian",
                   use_scale: bool = True, temperature: float = 0.05, gn_groups: int | None = None,
                   prefix: str = "") -> nn.Module:
    """A block equal to mmsegmentation's ``DisentangledNonLocal2d`` (the block of its ``DNLHead``; Yin et al.,
    "Disentangled Non-Local Neural Networks", ECCV 2020, arXiv 2006.06668): our ``dnl`` preset.

    mmseg's block is mmcv's ``NonLocal2d`` plus ``conv_mask`` (``C → 1``): queries and keys minus their means over
    the positions, the pairwise softmax of ``θφᵀ/(√C_s·τ)`` (``embedded_gaussian``; ``√C_s`` when ``use_scale``)
    or ``θφᵀ/N`` (``dot_product``, no τ), the unary term ``u = softmax(conv_mask(X))ᵀ g(X)`` (broadcast over the
    positions), and ``Y = X + conv_out(y + u)`` (``mmseg/models/decode_heads/dnl_head.py``, 0.30 and 1.2.2 alike):
    one output map on the sum, which is our single output map on ``A Z`` with ``A`` the sum of both graphs. mmseg
    has no learnable scale on the pairwise term (the DNL authors' code does: ``dnl`` with ``pairwise_gamma=True``).
    ``mode``, ``use_scale`` and ``temperature`` (DNLHead's defaults) are not in a state dict.

    Keys: ``g.conv.*``, ``theta.conv.*``, ``phi.conv.*`` (``C_s×C×1×1`` with bias), ``conv_mask.{weight,bias}``,
    ``conv_out.conv.weight`` (``C×C_s×1×1``), ``conv_out.conv.bias`` (without a norm), and the norm of mmseg's
    ``norm_cfg`` if any: ``conv_out.bn.*`` (BatchNorm/SyncBN, DNLHead's configs) → ``out_norm="bn"``, or
    ``conv_out.gn.*`` → ``out_norm="gn"`` (its groups are not in a state dict: ``gn_groups``). Equal in train and
    eval mode.
    """
    if mode not in MMSEG_DNL_MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MMSEG_DNL_MODES))} (DNLHead's modes), "
                         f"got {mode!r}")
    _bool("use_scale", use_scale)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or \
            temperature == float("inf"):
        raise ValueError(f"temperature: expected a positive finite number (DNLHead's, 0.05 by default), "
                         f"got {temperature!r}")
    what = f"from_mmseg_dnl(mode={mode!r})"
    sd = _select(state_dict, prefix, what)
    norm = _conv_out_norm(sd, what, prefix, gn_groups)
    required = [f"{m}.conv.{p}" for m in ("g", "theta", "phi") for p in ("weight", "bias")]
    out_required, optional = _conv_out_keys(norm)
    required += ["conv_mask.weight", "conv_mask.bias", *out_required]
    hints = []
    if any(k.startswith(("g.0.", "phi.0.")) for k in sd):
        hints.append("Keys 'g.0.conv.*' / 'phi.0.conv.*' are a sub-sampled NonLocal2d: mmseg's DNL block cannot "
                     "sub-sample (its unary term pools the full-size g).")
    if "gamma" in sd:
        hints.append("A 'gamma' is the DNL authors' pairwise scale, not mmseg's layout: build_block('dnl', C, "
                     "pairwise_gamma=True) holds it as 'edges.gamma'.")
    _check_keys(sd, required, optional, what, prefix, hints)
    cs, c, dim = _conv1x1(sd, "g.conv.weight", what, prefix)
    ones = (1,) * dim
    shapes: dict[str, Any] = {"g.conv.bias": (cs,), "theta.conv.weight": (cs, c, *ones), "theta.conv.bias": (cs,),
                              "phi.conv.weight": (cs, c, *ones), "phi.conv.bias": (cs,),
                              "conv_mask.weight": (1, c, *ones), "conv_mask.bias": (1,),
                              "conv_out.conv.weight": (c, cs, *ones), "conv_out.conv.bias": (c,),
                              **_conv_out_shapes(norm, c)}
    _check_shapes(sd, shapes, what, prefix, _shape_context(sd, "g.conv.weight", prefix, C=c, C_s=cs, dim=dim))
    if norm == "gn" and c % gn_groups:
        raise ValueError(f"{what}: gn_groups={gn_groups} does not divide C = {c}")
    r = _reduction(c, cs, prefix + "g.conv.weight", what)
    embedded = mode == "embedded_gaussian"
    block = build_block("dnl", c, dim=dim, reduction=r, kernel=mode, normalization="softmax" if embedded else "count",
                        scale=bool(use_scale and embedded), temperature=float(temperature) if embedded else 1.0,
                        bias=True, out_norm=norm, zero_init=False,
                        **({"norm_groups": gn_groups} if norm == "gn" else {}))
    ours = {"edges.theta.weight": sd["theta.conv.weight"], "edges.theta.bias": sd["theta.conv.bias"],
            "edges.phi.weight": sd["phi.conv.weight"], "edges.phi.bias": sd["phi.conv.bias"],
            "edges.mask.weight": sd["conv_mask.weight"], "edges.mask.bias": sd["conv_mask.bias"],
            "units.0.g.weight": sd["g.conv.weight"], "units.0.g.bias": sd["g.conv.bias"],
            **_conv_out_state(sd, norm, c)}
    return _load(block, ours, sd["g.conv.weight"], sd, what, prefix)


# --------------------------------------------------------------------------------------- DNL authors
def from_official_dnl(state_dict: Mapping[str, torch.Tensor] | nn.Module, *, temperature: float = 0.05,
                      downsample: bool = False, prefix: str = "") -> nn.Module:
    """A block equal to the DNL authors' ``NonLocal2d_bn`` (``_NonLocalNd_bn``; Yin et al., "Disentangled Non-Local
    Neural Networks", ECCV 2020, arXiv 2006.06668, code DNL-Semantic-Segmentation) with ``whiten_type=['channel']``
    and ``with_gc=True``, their DNL configs' settings: our ``dnl`` preset with ``pairwise_gamma=True``.

    Their forward: ``q, k`` (``conv_query``, ``conv_key``, ``P×C×1×1`` with bias) minus their means over the
    positions, ``S = softmax(qᵀk/(√P·τ))``, ``out = gamma·(V Sᵀ) + V·softmax(conv_mask(X))`` (``V = conv_value(X)``,
    ``gamma`` zero at init), then ``conv_out`` (``use_out=True``: ``V`` has ``P`` channels, ``conv_out`` ``P → C``
    without bias; ``use_out=False``: ``conv_value`` is ``C → C`` without bias and there is no ``conv_out``), then
    ``out_bn`` (BatchNorm2d) if present, ``Y = X + out``. ``use_out`` and ``out_bn`` are read from the keys;
    ``temperature`` (their configs' ``temp``, 0.05; their class's default is 1.0) is not in a state dict.

    The biases their convs lack (``conv_value`` with ``use_out=False``, ``conv_out``) are ours zero and frozen
    (``requires_grad=False``), so the block trains as theirs does. Refused: ``downsample=True`` (their max-pooled
    keys, values and mask input; our unary term pools over every position), the ``bn``/``bn_affine`` whitening
    (``key_bn``/``query_bn`` keys), a block without ``conv_mask`` (``with_gc=False``). Their ``with_unary`` term (the
    query mean against the keys) holds no parameters, so a state dict cannot show it: it is not converted.
    """
    _bool("downsample", downsample)
    if downsample:
        raise NotImplementedError("from_official_dnl: downsample=True (keys, values and the mask input max-pooled) "
                                  "is not expressed by nonlocalnet's dnl, whose unary term pools over every position")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or \
            temperature == float("inf"):
        raise ValueError(f"temperature: expected a positive finite number (their configs' temp, 0.05), "
                         f"got {temperature!r}")
    what = "from_official_dnl(NonLocal2d_bn)"
    sd = _select(state_dict, prefix, what)
    if any(k.startswith(("key_bn", "query_bn")) for k in sd):
        raise NotImplementedError(f"{what}: whiten_type 'bn' / 'bn_affine' (keys 'key_bn*', 'query_bn*') is not "
                                  "converted; only whiten_type=['channel'] (queries and keys minus their means)")
    use_out = "conv_out.weight" in sd
    out_bn = any(k.startswith("out_bn.") for k in sd)
    required = ["gamma", "conv_query.weight", "conv_query.bias", "conv_key.weight", "conv_key.bias",
                "conv_value.weight", "conv_mask.weight", "conv_mask.bias"]
    if use_out:
        required += ["conv_value.bias", "conv_out.weight"]
    if out_bn:
        required += [f"out_bn.{n}" for n in _BN_KEYS]
    hints = ["No 'conv_mask.*': with_gc=False, a whitened NL without the unary term, is not this converter's."] \
        if "conv_mask.weight" not in sd else []
    _check_keys(sd, required, [f"out_bn.{n}" for n in _BN_OPTIONAL], what, prefix, hints)
    p, c, dim = _conv1x1(sd, "conv_query.weight", what, prefix)
    ones = (1,) * dim
    cv = p if use_out else c
    shapes: dict[str, Any] = {"gamma": [(1,), ()], "conv_query.bias": (p,), "conv_key.weight": (p, c, *ones),
                              "conv_key.bias": (p,), "conv_value.weight": (cv, c, *ones), "conv_value.bias": (cv,),
                              "conv_mask.weight": (1, c, *ones), "conv_mask.bias": (1,),
                              "conv_out.weight": (c, p, *ones), "out_bn.num_batches_tracked": ()}
    shapes.update({f"out_bn.{n}": (c,) for n in _BN_KEYS})
    _check_shapes(sd, shapes, what, prefix, _shape_context(sd, "conv_query.weight", prefix, C=c, P=p, dim=dim) +
                  f"; use_out={use_out}")
    block = build_block("dnl", c, dim=dim, key_channels=p, value_channels=cv, out_proj=use_out, scale=True,
                        temperature=float(temperature), bias=True, out_norm="bn" if out_bn else "none",
                        zero_init=False, pairwise_gamma=True)
    like = sd["conv_query.weight"]
    ours = {"edges.gamma": sd["gamma"].reshape(1),
            "edges.theta.weight": sd["conv_query.weight"], "edges.theta.bias": sd["conv_query.bias"],
            "edges.phi.weight": sd["conv_key.weight"], "edges.phi.bias": sd["conv_key.bias"],
            "edges.mask.weight": sd["conv_mask.weight"], "edges.mask.bias": sd["conv_mask.bias"],
            "units.0.g.weight": sd["conv_value.weight"],
            "units.0.g.bias": sd["conv_value.bias"] if "conv_value.bias" in sd else like.new_zeros(cv)}
    if use_out:
        ours.update({"units.0.w.0.weight": sd["conv_out.weight"], "units.0.w.0.bias": like.new_zeros(c)})
    if out_bn:
        ours.update(_bn(sd, "out_bn", "units.0.norm.bn"))
    block = _load(block, ours, like, sd, what, prefix)
    frozen = [] if "conv_value.bias" in sd else [block.units[0].g.bias]  # biases their convs do not have
    if use_out:
        frozen.append(block.units[0].w[0].bias)
    for t in frozen:
        t.requires_grad_(False)
    return block


# timm's GlobalContext key -> mmcv ContextBlock key (the same GCNet block; its mapping is _mmcv_context_block's)
_TIMM_GC_KEYS = {"conv_attn": "conv_mask", "mlp_add.fc1": "channel_add_conv.0", "mlp_add.norm": "channel_add_conv.1",
                 "mlp_add.fc2": "channel_add_conv.3", "mlp_scale.fc1": "channel_mul_conv.0",
                 "mlp_scale.norm": "channel_mul_conv.1", "mlp_scale.fc2": "channel_mul_conv.3"}


def _timm_global_context(state_dict: Any, prefix: str) -> nn.Module:
    """timm's ``GlobalContext`` (Cao et al., "GCNet", ICCVW 2019, arXiv 1904.11492, as timm ships it): the
    layout of mmcv's ``ContextBlock`` under other names, converted by :func:`_mmcv_context_block`.

    Keys: ``conv_attn.{weight,bias}`` (``use_attn=True``, timm's default), ``mlp_scale.{fc1,norm,fc2}.*``
    (``fuse_scale=True``, the default: our ``fusion="mul"``) and/or ``mlp_add.*`` (``fuse_add``: ``"add"``; both:
    ``"add_mul"``, timm applies the gate first as mmcv does). timm's ``LayerNorm2d`` has ``eps=1e-6`` (mmcv's
    ``LayerNorm`` 1e-5): the converted block's LayerNorms get ``eps=1e-6``. timm's gate is its default
    ``sigmoid``; another ``gate_layer`` is not in a state dict and is not converted.
    """
    what = "from_timm(module='GlobalContext')"
    sd = _select(state_dict, prefix, what)
    if "conv_attn.weight" not in sd and "conv_attn.bias" not in sd:
        raise NotImplementedError(f"{what}: no 'conv_attn.*' keys: this is use_attn=False (context = mean over "
                                  "positions), which nonlocalnet's gc preset does not express")
    branches = [b for b in ("mlp_add", "mlp_scale") if any(k.startswith(b + ".") for k in sd)]
    required = ["conv_attn.weight", "conv_attn.bias"] + [f"{b}.{m}.{p}" for b in branches
                                                         for m in ("fc1", "norm", "fc2") for p in ("weight", "bias")]
    if not branches:
        raise ValueError(f"{what}: no fusion branch: expected keys 'mlp_scale.*' and/or 'mlp_add.*'; got keys "
                         f"{_fmt_keys(prefix + k for k in sd)}")
    _check_keys(sd, required, [], what, prefix, [])
    renamed = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        renamed[f"{_TIMM_GC_KEYS[head]}.{leaf}"] = v
    block = _mmcv_context_block(renamed, "")
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    return block
