"""The blocks of the literature as presets: a few defaults each over :mod:`nonlocalnet.blocks`.

A preset fixes defaults (kernel, normalization, filter, output norm) from its paper; every option can
be overridden, so e.g. ``build_block("snl", 64, kernel="embedded_gaussian")`` is SNL's filter on a
softmax-free symmetric Gaussian graph. docs/framework.md has the table these defaults come from.

A preset is registered (:data:`PRESETS`, :func:`register_block`) exactly as a user's block is; the options it takes
are the common ones below, its graph mode's (:data:`~nonlocalnet.kernels.GRAPH_MODES`) and its filters'
(:data:`~nonlocalnet.filters.FILTERS`), each checked by the part that owns it.

Each preset's ``reference`` (printed by ``nonlocalnet blocks``) names its paper: authors, title, venue and
year, and the equation or section. "Unifying Nonlocal Blocks" is Zhu et al., "Unifying Nonlocal Blocks for
Neural Networks", ICCV 2021 (arXiv:2108.02451; equation and section numbers as in its submitted version); "A
Spectral Nonlocal Block" is Zhu, She, Zhang, Guo, "A Spectral Nonlocal Block for Neural Networks", ICLR 2020
submission (OpenReview rkgb9kSKwS). Wang et al. is arXiv:1711.07971, Tao et al. arXiv:1806.00681.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels as K
from . import spectral_filters  # noqa: F401 - registers the spectral filters (cayley, heat, wavelet)
from .blocks import FUSIONS, MAX_TAYLOR_ORDER, OUT_MAPS, OUT_NORMS, Affinity, NonlocalBlock, NonlocalUnit  # noqa: F401
from .filters import FILTERS, filter_options
from .registry import Registry, did_you_mean
from .spectral_filters import check_approx_order


@dataclass(frozen=True)
class Preset:
    """A block of the literature (or a user's): its name, its paper (``reference``: authors, title, venue,
    equation), its defaults over the options, and its graph mode (a name in
    :data:`~nonlocalnet.kernels.GRAPH_MODES`, whose own options the block then takes too)."""

    name: str
    reference: str
    defaults: dict[str, Any]
    mode: str = "positions"


# the options every block takes (filters' options, e.g. `order`, and graph modes', e.g. CGNL's `groups`, are theirs)
COMMON = dict(
    reduction=2, kernel="embedded_gaussian", normalization="softmax", scale=False, bias=True, sub_sample=False,
    units=1, recurrence=1, filter="nl", out_norm="bn", zero_init=True, backend="auto",
    memory_budget=256, value_channels=None, out_proj=True, norm_groups=None,
    key_channels=None, whiten=False, unary=False, temperature=1.0, value_proj=True, out_map="linear",
    bottleneck_channels=None, fusion="add", heads=1,
    pool_sizes=None,
)

PRESETS: Registry[Preset] = Registry("block", "name")


def register_block(preset: Preset, *, replace: bool = False) -> Preset:
    """Make a block available by name (``build_block``, configs, placements, ``nonlocalnet blocks``). Its defaults
    are checked now, so a preset that cannot be built is refused at registration."""
    if not isinstance(preset, Preset):
        raise TypeError(f"preset: expected a nonlocalnet.presets.Preset, got {type(preset).__name__}")
    K.GRAPH_MODES[preset.mode]  # noqa: B018 - an unknown mode is an error here
    known = set(COMMON) | set(K.GRAPH_MODES[preset.mode].options) | set(filter_options())
    unknown = sorted(set(preset.defaults) - known)
    if unknown:
        raise ValueError(f"defaults: unknown option(s) {', '.join(map(repr, unknown))} for block {preset.name!r}")
    return PRESETS.register(preset.name, preset, replace=replace)

_SNL = dict(kernel="relu_dot", normalization="symmetric", out_norm="bn_relu", zero_init=False, bias=False)

for _preset in [
        Preset("nl", 'Wang et al., "Non-local Neural Networks", CVPR 2018: Y = X + BN(A Z W), A = softmax(θφᵀ) '
                     '(as Eq. 1-2 of Zhu et al., "A Spectral Nonlocal Block", ICLR 2020 submission)',
               dict(filter="nl")),
        Preset("ns", 'Tao et al., "Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal Modeling", NeurIPS '
                     '2018, Eq. 8: nonlocal stage, F = (A - I) Z W on one A per stage (also Zhu et al., "A Spectral '
                     'Nonlocal Block", ICLR 2020 submission, Eq. 3)', dict(filter="ns")),
        Preset("snl", 'Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 5: spectral '
                      'nonlocal, F = Z W_1 + A Z W_2, A = D^-1/2 M̂ D^-1/2 (also Zhu et al., "A Spectral Nonlocal '
                      'Block", ICLR 2020 submission, Eq. 8)',
               dict(_SNL, filter="snl")),
        Preset("gsnl", 'Zhu et al., "A Spectral Nonlocal Block for Neural Networks", ICLR 2020 submission, Eq. 10: '
                       'generalized SNL, F = Z W_1 + A Z W_2 + (2A - I) Z W_3',
               dict(_SNL, filter="gsnl")),
        Preset("cheby", 'Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 3-4: '
                        'Chebyshev SNL of order K, F = Σ_k T_k(A) Z W_k (K=1 is Eq. 5)',
               dict(_SNL, filter="cheby", order=2)),
        Preset("cayley", "Cayley filter of order R (Levie et al., CayleyNets, IEEE TSP 2018, Eq. 8) on the SNL graph: "
                         "F = Z W_0 + Σ_j [Re C(hL)^j Z W_j' + Im C(hL)^j Z W_j''], C(x) = (x - i)/(x + i), "
                         "L = I - A, learnable zoom h > 0 (Zhu et al., ICCV 2021, Remark 1)",
               dict(_SNL, filter="cayley", order=2)),
        Preset("heat", "Heat-diffusion filter on the SNL graph: F = Z W_0 + Σ_j exp(-t_j L) Z W_j, L = I - A, "
                       "learnable t_j > 0 (Zhu et al., ICCV 2021, Remark 1)",
               dict(_SNL, filter="heat", order=2)),
        Preset("wavelet", "Spectral graph wavelets (Hammond et al., ACHA 2011) on the SNL graph: low-pass "
                          "exp(-s_0 L) Z W_0 + Σ_j g(s_j L) Z W_j, g(x) = x e^(1-x), learnable s_j > 0 "
                          "(Zhu et al., ICCV 2021, Remark 1)",
               dict(_SNL, filter="wavelet", order=3)),
        Preset("a2", 'Chen et al., "A²-Nets: Double Attention Networks", NeurIPS 2018: double attention, '
                     'A = softmax_n(θ) softmax_N(φ)ᵀ, F = A Z W (as in Zhu et al., "Unifying Nonlocal Blocks", '
                     'ICCV 2021, §2.2 (3), §B.3)',
               dict(kernel="double_attention", normalization="none", filter="nl", out_norm="none",
                    zero_init=False)),
        Preset("cgnl", 'Yue et al., "Compact Generalized Non-local Network", NeurIPS 2018: graph over positions '
                       '× channels per group, Y = X + GN(F) (as in Zhu et al., "Unifying Nonlocal Blocks", '
                       'ICCV 2021, §2.2 (4), §B.4)',
               dict(kernel="dot_product", normalization="none", filter="nl", out_norm="gn", zero_init=False,
                    bias=False), mode="channels"),
        Preset("cc", 'Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019: masked '
                     'softmax over row+column, F = A X W_v, Y = X + γF, recurrence 2 (as in Zhu et al., '
                     '"Unifying Nonlocal Blocks", ICCV 2021, §2.2 (5), §B.5)',
               dict(reduction=8, filter="nl", out_norm="gamma", zero_init=True, out_proj=False, recurrence=2),
               mode="crisscross"),
        Preset("gc", 'Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW '
                     '2019 (arXiv 1904.11492), Eq. 4: global context, A = 1·aᵀ, a = softmax(w_m X) (rank 1), Z = X, '
                     'bottleneck transform conv-LayerNorm-ReLU-conv, fusion by addition',
               dict(kernel="unary", normalization="softmax", filter="nl", value_proj=False, out_map="bottleneck",
                    fusion="add", out_norm="none", zero_init=True)),
        Preset("dnl", 'Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020 (arXiv 2006.06668), Eq. 12: '
                      'A = softmax((θ-μ_θ)(φ-μ_φ)ᵀ/(√C_s·τ)) + 1·softmax(w_m X)ᵀ, F = A Z W',
               dict(filter="nl", whiten=True, unary=True, temperature=0.05, scale=True)),
        Preset("efficient", 'Shen, Zhang, Zhao, Yi, Li, "Efficient Attention: Attention with Linear Complexities", '
                            'WACV 2021: E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V), ρ_q a softmax over channels, ρ_k over '
                            'positions, then a reprojection and the residual: A = ρ_q(Q) ρ_k(K)ᵀ (A²\'s graph, '
                            'rank C_s, never N x N), F = A Z W, Y = X + F',
               dict(kernel="double_attention", normalization="none", filter="nl", out_norm="none", zero_init=False)),
        Preset("apnb", 'Zhu, Xu, Huang, Bai, "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV '
                       '2019, the asymmetric pyramid non-local block (APNB): NL with keys and values '
                       'pyramid-pooled (adaptive average pools to s^d bins, s = 1, 3, 6, 8: N\' = 110 in 2-D), '
                       'A = softmax(θφᵀ/√C_s), Y = X + A Z W (W zero)',
               dict(filter="nl", sub_sample=True, pool_sizes=(1, 3, 6, 8), scale=True, out_norm="none",
                    zero_init=True)),
        Preset("external", 'Guo, Liu, Mu, Hu, "Beyond Self-attention: External Attention using Two Linear Layers for '
                           'Visual Tasks", TPAMI 2022, external attention: A = DoubleNorm(θ M_kᵀ) against S '
                           'learned memory slots (N x S; softmax over positions, then l1 over slots), '
                           'F = A M_v W, Y = X + BN(F)',
               dict(kernel="embedded_gaussian", normalization="double", reduction=1, filter="nl", value_proj=False,
                    out_norm="bn", zero_init=False), mode="memory"),
        Preset("agent", 'Han, Ye, Han, Xia, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of Softmax '
                        'and Linear Attention", ECCV 2024, agent attention: A = softmax(θ Agᵀ/√C_s) '
                        'softmax(Ag φᵀ/√C_s) with n = 49 agents Ag pooled from the queries (rank n, never '
                        'N x N), F = A Z W, Y = X + F '
                        '(without their depthwise-conv and position-bias terms)',
               dict(kernel="embedded_gaussian", normalization="softmax", scale=True, reduction=1, filter="nl",
                    out_norm="none", zero_init=False), mode="agents"),
]:
    register_block(_preset)


register_block(Preset(
    "axial", 'Ho, Kalchbrenner, Weissenborn, Salimans, "Axial Attention in Multidimensional Transformers", arXiv '
             '1912.12180, 2019; Wang et al., "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation", '
             'ECCV 2020 (its axial-attention layer without the positional terms): softmax along H, then along W on its '
             'output, A = A_W A_H, F = A Z W, Y = X + BN(F)', dict(filter="nl", scale=True), mode="axial"))
register_block(Preset(
    "neighborhood", 'Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023 (neighborhood '
                    'attention; also Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS '
                    '2019): softmax over a k x k window around each position, shifted inward at the borders, '
                    'F = A Z W, Y = X + BN(F)',
    dict(filter="nl", scale=True), mode="neighborhood"))


def list_blocks() -> list[str]:
    """Names accepted by :func:`build_block`."""
    return list(PRESETS)


def _choice(arg: str, value: Any, valid: tuple[str, ...] | list[str], what: str = "") -> None:
    if value not in valid:
        raise ValueError(f"{arg}: unknown {what or arg} {value!r}{did_you_mean(value, [str(v) for v in valid])}; "
                         f"valid: {', '.join(map(str, valid))}")


def _positive_number(arg: str, value: Any, expected: str) -> None:
    """A finite number > 0 (not a bool): else TypeError (not a number) or ValueError (NaN, inf, <= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg}: expected {expected}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{arg}: expected {expected}, got {value!r}")


def resolve_options(name: str, in_channels: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """Merge a preset's defaults with user options and check that they go together."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a block name (str), got {type(name).__name__}")
    preset = PRESETS[name]
    mode_spec = K.GRAPH_MODES[preset.mode]
    by_filter = filter_options()
    valid = tuple(COMMON) + tuple(mode_spec.options) + tuple(k for k in by_filter if k not in COMMON)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        owners = [p for p, pr in PRESETS.items() if unknown[0] in K.GRAPH_MODES[pr.mode].options]
        if owners:
            raise ValueError(f"option {unknown[0]!r} does not apply to block {name!r} (only to "
                             f"{', '.join(owners)}); valid options for {name!r}: {', '.join(valid)}")
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for block {name!r}"
                         f"{did_you_mean(unknown[0], list(valid))}; valid options: {', '.join(valid)}")
    o = {**COMMON, **{k: spec.default for k, spec in mode_spec.options.items()}, **{k: None for k in by_filter},
         **preset.defaults}
    if "kernel" in options and "normalization" not in options:
        # a user kernel keeps the preset's normalization where it is defined for that kernel
        kern = K.KERNELS.get(options["kernel"])
        if kern is not None and o["normalization"] not in kern.normalizations:
            o["normalization"] = kern.natural_normalization
    o.update(options)

    if isinstance(dim, bool) or dim not in (1, 2, 3):
        raise ValueError(f"dim: expected 1, 2 or 3 (number of spatial axes), got {dim!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
    r = o["reduction"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"reduction: expected a positive int (C_s = C // reduction), got {r!r}")
    if in_channels < r and o["key_channels"] is None:
        raise ValueError(f"in_channels ({in_channels}) must be >= reduction ({r}) so that "
                         f"C_s = in_channels // reduction >= 1")
    for key in ("units", "recurrence"):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
            raise ValueError(f"{key}: expected an int >= 1, got {o[key]!r}")
    for key in ("bias", "sub_sample", "zero_init", "out_proj"):
        if not isinstance(o[key], bool):
            raise TypeError(f"{key}: expected a bool, got {o[key]!r}")
    ps = o["pool_sizes"]  # how sub_sample pools: None is Wang et al.'s 2x max-pool, a tuple APNB's pyramid
    if ps is not None:
        if not isinstance(ps, (tuple, list)) or not ps or \
                any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ps):
            raise ValueError(f"pool_sizes: expected a non-empty tuple of positive ints (APNB's pyramid of adaptive "
                             f"average pools, e.g. (1, 3, 6, 8)) or None, got {ps!r}")
        if not o["sub_sample"]:
            raise ValueError("pool_sizes: sets how sub_sample=True pools the keys and values (APNB's pyramid); "
                             "pass sub_sample=True, or pool_sizes=None")
        o["pool_sizes"] = tuple(ps)
    if not isinstance(o["scale"], bool):
        _positive_number("scale", o["scale"], "a bool (True: 1/sqrt(C_s)) or a positive finite multiplier")
    _positive_number("memory_budget", o["memory_budget"], "a positive finite number of MiB")
    if o["norm_groups"] is not None and (isinstance(o["norm_groups"], bool) or not isinstance(o["norm_groups"], int)
                                         or o["norm_groups"] < 1):
        raise ValueError(f"norm_groups: expected a positive int (or None), got {o['norm_groups']!r}")
    for key, spec in mode_spec.options.items():  # the graph mode's own options (CGNL's groups, ...)
        o[key] = spec.resolve(key, o[key])

    for key in ("whiten", "unary", "value_proj"):
        if not isinstance(o[key], bool):
            raise TypeError(f"{key}: expected a bool, got {o[key]!r}")
    t = o["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature: expected a positive finite number (logits / temperature), got {t!r}")
    _choice("out_map", o["out_map"], OUT_MAPS)
    _choice("fusion", o["fusion"], FUSIONS)

    kern, norm, backend, mode = o["kernel"], o["normalization"], o["backend"], preset.mode
    _choice("out_norm", o["out_norm"], OUT_NORMS)
    _choice("backend", backend, K.BACKENDS)
    FILTERS[o["filter"]]  # noqa: B018 - an unknown filter is an error naming the valid ones
    _choice("normalization", norm, K.NORMALIZATIONS)
    if mode_spec.pairwise_only:
        for key, default in (("whiten", False), ("unary", False)):
            if o[key] != default:
                takes = [p for p, pr in PRESETS.items() if not K.GRAPH_MODES[pr.mode].pairwise_only]
                raise ValueError(f"{key}: applies to the position graphs ({', '.join(takes)}), not to {name!r}")
    _choice("kernel", kern, K.mode_kernels(mode))
    unary_kernel = K.KERNELS[kern].unary
    if norm not in K.valid_normalizations(kern, mode):
        if mode == "crisscross":
            raise ValueError(f"normalization: cc uses the masked softmax ('softmax'), got {norm!r}")
        if mode == "channels":
            raise ValueError(f"normalization: cgnl supports 'none' or 'count', got {norm!r}")
        if mode_spec.normalizations is not None:
            raise ValueError(f"normalization: {name} ({mode} graph) takes "
                             f"{', '.join(map(repr, mode_spec.normalizations))}, got {norm!r}")
        if unary_kernel:
            raise ValueError(f"normalization: the unary kernel (GC's attention pooling, A = 1·aᵀ) takes 'softmax', "
                             f"got {norm!r}")
        raise ValueError(f"normalization='softmax' is the row normalization of the exp kernels "
                         f"({', '.join(K.exp_kernels())}); kernel {kern!r} takes "
                         f"{', '.join(map(repr, K.valid_normalizations(kern)))}")
    backends = K.valid_backends(kern, norm, mode)
    _check_approx(o, options)
    approx = o.get("approx")  # an approximate softmax graph builds its own factors (any backend check is its own)
    # the exact graph factorizes (M = P Qᵀ on the low-rank backend): the spectral filters' exact path applies there
    factored = kern in K.lowrank_kernels() and backend in ("auto", "lowrank") and mode == "positions"
    if backend not in backends and approx is None:
        if mode != "positions":
            raise ValueError(f"backend: {name} supports {', '.join(map(repr, backends))}, got {backend!r}")
        if backend == "lowrank":
            raise ValueError(f"backend='lowrank' needs {K.backend_requirement('lowrank')}; kernel {kern!r} "
                             f"does not factor: use {', '.join(map(repr, backends[1:]))}")
        raise ValueError(f"backend={backend!r} needs {K.backend_requirement(backend)}, got kernel={kern!r}, "
                         f"normalization={norm!r}; valid: {', '.join(map(repr, backends))}")
    if mode == "crisscross" and o["sub_sample"]:
        raise ValueError("sub_sample: criss-cross attention does not go with sub-sampling (keys must stay "
                         "on the query's row and column)")
    if mode in ("axial", "neighborhood") and o["sub_sample"]:
        raise ValueError(f"sub_sample: {mode} attention does not go with sub-sampling (the keys of each query are "
                         f"its own {'axis lines' if mode == 'axial' else 'window'} at full resolution)")
    if unary_kernel and o["unary"]:
        raise ValueError("unary=True adds a unary term to a pairwise graph; kernel='unary' already is one")
    if unary_kernel and o["whiten"]:
        raise ValueError("whiten: whitens the queries and keys of a pairwise kernel; kernel='unary' has none")
    exp_logits = K.KERNELS[kern].exp and mode != "channels"
    if "temperature" in options and o["temperature"] != 1.0 and not exp_logits:
        raise ValueError(f"temperature: divides the logits of the exp kernels ({', '.join(K.exp_kernels())}), "
                         f"not kernel={kern!r}")
    if o.get("pairwise_gamma") and (unary_kernel or not o["unary"]):
        raise ValueError("pairwise_gamma: scales the pairwise term of a pairwise + unary graph (unary=True, as dnl); "
                         f"kernel={kern!r}, unary={o['unary']!r} has no such sum")
    if (unary_kernel or o["unary"]) and o["sub_sample"]:
        raise ValueError("sub_sample: the unary term (gc, dnl) pools over every position; use sub_sample=False")
    if norm == "symmetric" and o["sub_sample"]:
        raise ValueError("normalization='symmetric' needs a square affinity (N' = N) and does not go with "
                         "sub_sample=True; use normalization='row' or sub_sample=False")

    # the filter: its own options (order, spectral_path, ...) checked by its spec; what it is decides the rest
    fspec = FILTERS[o["filter"]]
    for key, owners in by_filter.items():
        if key not in fspec.options and o.get(key) is not None:
            raise ValueError(f"{key}: applies to filter {', '.join(map(repr, owners))}, not to "
                             f"filter={o['filter']!r}")
    fopts = fspec.resolve({k: o[k] for k in fspec.options if o.get(k) is not None})
    o.update(fopts)
    with torch.random.fork_rng(devices=[]):  # a filter whose init draws numbers: the block's init stays the same
        probe = fspec.make(**fopts)
    polynomial = probe.chebyshev() is not None
    if mode_spec.bipartite:  # the key nodes are not positions (External Attention's memory slots): A is N x S
        if o["sub_sample"]:
            raise ValueError(f"sub_sample: {name}'s keys are learned memory slots, not positions; use "
                             f"sub_sample=False")
        if not polynomial or (probe.max_power or 0) >= 2:
            raise ValueError(f"filter: {name}'s graph is N x S (positions x memory slots), not square: only filters "
                             f"of order <= 1 apply (nl, ns, snl), got filter={o['filter']!r}")
    if not polynomial:  # a matrix function of A (the spectral filters): a square graph over the positions
        if preset.mode == "channels":
            raise ValueError(f"filter={o['filter']!r}: spectral filters act on the graph over positions; cgnl's graph "
                             f"over positions x channels is not supported")
        if o["sub_sample"]:
            raise ValueError(f"sub_sample: filter={o['filter']!r} is a function of a square affinity; use "
                             f"sub_sample=False")
        if o["unary"]:
            raise ValueError(f"unary: filter={o['filter']!r} on a pairwise + unary graph (DNL's sum, row sums 2, "
                             f"eigenvalues up to 2) is not supported: the graph does not factor and its spectrum "
                             f"leaves [-1, 1], where the Chebyshev approximation is fitted; use unary=False")
    if probe.exact_lowrank:
        if o.get("spectral_path") == "exact" and approx is None and not factored:
            raise ValueError(f"spectral_path='exact' needs a factorizable kernel ({', '.join(K.lowrank_kernels())}) "
                             f"on the 'lowrank' or 'auto' backend, got kernel={kern!r}, backend={backend!r}")
        if factored and backend == "auto":
            o["backend"] = "lowrank"  # the exact r x r path, also where `auto` would form a small dense A
    if "approx_order" in fopts:  # warns with the measured error where the approximation will be used and is coarse
        check_approx_order(o["filter"], o["order"], o["approx_order"], used=(
            o["spectral_path"] == "chebyshev" or (approx is None and not factored)))
    max_power = probe.max_power if polynomial else None
    if max_power is not None and max_power >= 2 and o["sub_sample"]:
        raise ValueError(f"sub_sample: powers of A (order {max_power}) need a square affinity; "
                         f"use sub_sample=False with filter={o['filter']!r}")
    n_terms = probe.n_terms
    if not o["out_proj"] and n_terms != 1:
        raise ValueError(f"out_proj=False (F = A Z without W) needs a one-term filter, filter={o['filter']!r} "
                         f"has {n_terms} terms")

    key_channels = o["key_channels"]
    if key_channels is None:
        key_channels = in_channels // r
    elif isinstance(key_channels, bool) or not isinstance(key_channels, int) or key_channels < 1:
        raise ValueError(f"key_channels: expected a positive int (C_s, given directly), got {key_channels!r}")
    elif "reduction" in options:
        raise ValueError(f"key_channels ({key_channels}) and reduction ({options['reduction']}) both set C_s; "
                         f"give one")
    vc = o["value_channels"]
    if vc is None:
        vc = in_channels if not (o["out_proj"] and o["value_proj"]) else key_channels
    if isinstance(vc, bool) or not isinstance(vc, int) or vc < 1:
        raise ValueError(f"value_channels: expected a positive int, got {vc!r}")
    if not o["out_proj"] and vc != in_channels:
        raise ValueError(f"value_channels: out_proj=False needs value_channels == in_channels ({in_channels}), "
                         f"got {vc}")
    if not o["value_proj"] and vc != in_channels:
        raise ValueError(f"value_channels: value_proj=False (Z = X) needs value_channels == in_channels "
                         f"({in_channels}), got {vc}")
    bc = o["bottleneck_channels"]
    if o["out_map"] == "bottleneck":
        if bc is None:
            bc = max(1, in_channels // 16)  # GCNet's ratio 1/16
        if isinstance(bc, bool) or not isinstance(bc, int) or bc < 1:
            raise ValueError(f"bottleneck_channels: expected a positive int (C_b of the bottleneck), got {bc!r}")
        if not o["out_proj"]:
            raise ValueError("out_map='bottleneck' is an output map: it does not go with out_proj=False")
        if preset.mode == "channels":
            raise ValueError("out_map='bottleneck' does not apply to cgnl (its output map is a grouped conv)")
    elif bc is not None:
        raise ValueError(f"bottleneck_channels: applies to out_map='bottleneck', not out_map={o['out_map']!r}")
    if o["fusion"] == "mul" and o["out_norm"] != "none":
        raise ValueError(f"out_norm: fusion='mul' (Y = X * sigmoid(F)) has no additive branch to normalize; use "
                         f"out_norm='none', got {o['out_norm']!r}")
    if preset.mode == "channels":
        g = o["groups"]
        if key_channels % g or in_channels % g or vc % g:
            raise ValueError(f"groups ({g}) must divide in_channels ({in_channels}) and C_s ({key_channels})")
        if vc != key_channels:
            raise ValueError("value_channels: cgnl's values pair channel-by-channel with θ and φ; "
                             f"value_channels must equal C_s ({key_channels})")
    ng = o["norm_groups"] if o["norm_groups"] is not None else o.get("groups", 1)
    if o["out_norm"] == "gn" and in_channels % ng:
        raise ValueError(f"norm_groups ({ng}) must divide in_channels ({in_channels}) for out_norm='gn'")
    if o["out_norm"] == "bn_relu" and o["zero_init"]:
        raise ValueError("zero_init=True does not go with out_norm='bn_relu': relu(BN(F)) with a zero BN scale "
                         "outputs 0 with zero gradient, so the block would never train")
    _check_heads(name, mode_spec, o, in_channels, key_channels, vc)
    o.update(key_channels=key_channels, value_channels=vc, norm_groups=ng, bottleneck_channels=bc)
    o["filter_options"] = fopts
    return o


def _check_approx(o: dict[str, Any], given: dict[str, Any]) -> None:
    """``approx`` (positions graphs): a factorized approximation of the softmax of an exp kernel, so only with
    such a kernel, the softmax (row) normalization and the backends that mean "as the block computes it"."""
    approx = o.get("approx")
    if approx is None:
        if "approx_features" in given:
            raise ValueError("approx_features: the number of random features or landmarks of approx='performer' or "
                             "'nystrom'; give approx too (approx=None is the exact softmax)")
        return
    kern = K.KERNELS[o["kernel"]]
    if not kern.exp or kern.unary:
        exp = ", ".join(k for k in K.exp_kernels() if not K.KERNELS[k].unary)
        why = (" (a factorizable kernel: its graph is already low-rank, exactly)" if kern.factorizable
               else "")
        raise ValueError(f"approx={approx!r} approximates the softmax of an exp kernel ({exp}); kernel "
                         f"{o['kernel']!r} is not one{why}")
    if o["normalization"] not in ("softmax", "row"):
        raise ValueError(f"approx={approx!r} approximates the softmax (row) normalization, got normalization="
                         f"{o['normalization']!r}; use normalization='softmax'")
    if o.get("heads", 1) != 1:
        raise ValueError(f"heads: approx={approx!r} approximates one softmax graph; heads={o['heads']} with approx is "
                         f"not supported (use heads=1)")
    if o["backend"] not in ("auto", "lowrank"):
        raise ValueError(f"backend: approx={approx!r} builds its own factorized graph (the 'lowrank' backend); use "
                         f"backend='auto' or 'lowrank', got {o['backend']!r}")


def _check_heads(name: str, mode_spec: K.GraphMode, o: dict[str, Any], in_channels: int, key_channels: int,
                 value_channels: int) -> None:
    """``heads``: a positive int; ``> 1`` needs a kernel that takes heads (``Kernel.takes_heads``: the exp kernels,
    A²'s) on a graph mode that builds multi-head graphs, and
    ``heads`` must divide the query/key channels and the value channels."""
    h = o["heads"]
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise ValueError(f"heads: expected a positive int (graphs on channel groups), got {h!r}")
    if h == 1:
        return
    kern = K.KERNELS[o["kernel"]]
    if not kern.takes_heads or not mode_spec.multihead:
        modes = [m for m, spec in K.GRAPH_MODES.items() if spec.multihead]
        raise ValueError(f"heads={h}: multi-head graphs are for the kernels {', '.join(K.multihead_kernels())} on "
                         f"the {', '.join(modes)} graphs; got kernel={o['kernel']!r} on block {name!r} "
                         f"({mode_spec.name} graph)")
    qk = key_channels if kern.projected else in_channels
    what = "C_s" if kern.projected else "in_channels (the Gaussian's queries and keys are X)"
    if qk % h or value_channels % h:
        raise ValueError(f"heads ({h}) must divide {what} ({qk}) and value_channels ({value_channels}): each head "
                         f"takes an equal channel group of the queries, keys and values")


# Affinity's keyword for a graph mode's option, where the two names differ (CGNL's Taylor order)
_AFFINITY_KEYWORD = {"taylor_order": "order"}
_AFFINITY_KEYWORDS = frozenset(inspect.signature(Affinity.__init__).parameters) - {"self", "mode_options"}
# likewise the unit's keyword for a graph mode's option that also shapes the unit (CGNL's groups group the value
# and output projections; External Attention's memory slots replace the values)
_UNIT_KEYWORD = {"groups": "proj_groups"}
_UNIT_KEYWORDS = frozenset({"proj_groups", "memory_size"})


def build_block(name: str, in_channels: int, *, dim: int = 2, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, **options: Any) -> NonlocalBlock:
    """Build a nonlocal block ``(B, C, *S) -> (B, C, *S)`` with ``len(S) == dim``.

    ``name`` is one of :func:`list_blocks` (a registered :class:`Preset`). Options: the common ones
    (:data:`COMMON`: ``reduction``, ``kernel``, ``normalization``, ``scale``, ``bias``, ``sub_sample``, ``units``,
    ``recurrence``, ``filter``, ``out_norm``, ``zero_init``, ``backend``, ``memory_budget`` (MiB),
    ``value_channels``, ``out_proj``, ``norm_groups``, ``key_channels``, ``whiten``, ``unary``, ``temperature``,
    ``value_proj``, ``out_map``, ``bottleneck_channels``, ``fusion``, ``heads``, ``pool_sizes``), the filter's
    (:data:`FILTERS`, e.g. ``order``; the spectral filters' ``spectral_path`` and ``approx_order``) and the graph
    mode's (CGNL's ``groups``, ``taylor_order``, ``rbf_gamma``, ``rbf_prefactor``; External Attention's
    ``memory_size``); :func:`block_options` lists them for a block.
    ``device``/``dtype``: where and in which dtype the parameters are created (PyTorch's factory arguments).
    """
    o = resolve_options(name, in_channels, dim, options)
    preset = PRESETS[name]
    fk = dict(device=device, dtype=dtype)
    # the graph mode's own options (resolved by resolve_options): all of them as Affinity.mode_options, and those
    # Affinity takes as keywords (the built-in modes') also so; a mode without one leaves Affinity's "off" value
    mode_options = {k: o[k] for k in K.GRAPH_MODES[preset.mode].options}
    keywords = {_AFFINITY_KEYWORD.get(k, k): v for k, v in mode_options.items()}
    keywords = {k: v for k, v in keywords.items() if k in _AFFINITY_KEYWORDS}
    unit_keywords = {_UNIT_KEYWORD.get(k, k): v for k, v in mode_options.items()}
    unit_keywords = {k: v for k, v in unit_keywords.items() if k in _UNIT_KEYWORDS}
    graph = Affinity(
        in_channels, o["key_channels"], dim=dim, kernel=o["kernel"], normalization=o["normalization"],
        scale=o["scale"], bias=o["bias"], sub_sample=o["sub_sample"], backend=o["backend"],
        memory_budget=o["memory_budget"], mode=preset.mode, whiten=o["whiten"], unary=o["unary"],
        temperature=o["temperature"], pool_sizes=o["pool_sizes"], heads=o["heads"], mode_options=mode_options,
        **keywords, **fk,
    )
    fspec = FILTERS[o["filter"]]
    units = [
        NonlocalUnit(in_channels, o["value_channels"], fspec.make(**o["filter_options"]).to(**fk), dim=dim,
                     bias=o["bias"], out_norm=o["out_norm"], zero_init=o["zero_init"], norm_groups=o["norm_groups"],
                     out_proj=o["out_proj"], sub_sample=o["sub_sample"],
                     value_proj=o["value_proj"], out_map=o["out_map"],
                     bottleneck_channels=o["bottleneck_channels"] or 1, fusion=o["fusion"],
                     pool_sizes=o["pool_sizes"], **unit_keywords, **fk)
        for _ in range(o["units"])
    ]
    shown = {k: v for k, v in o.items() if k in options}
    return NonlocalBlock(name, in_channels, dim, graph, units, recurrence=o["recurrence"], options=shown)


def block_options(name: str) -> list[str]:
    """The options block ``name`` takes: the common ones, its graph mode's and the registered filters'."""
    mode = K.GRAPH_MODES[PRESETS[name].mode]
    return list(COMMON) + list(mode.options) + [k for k in filter_options() if k not in COMMON]
