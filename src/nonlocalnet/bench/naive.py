"""The naive baselines: each preset computed the way public code computes it, on NCHW, from the papers' equations.

``nonlocalnet bench --baseline naive`` times these side by side with the block (same weights, same input) and
prints ``naive time / block time``. Each function here takes a built block and reads its parameters, so the two
compute the same output — ``tests/test_naive.py`` checks that in float64 — and the ratio compares formulations,
not models. Nothing here is shared with :mod:`nonlocalnet.affinity` or :mod:`nonlocalnet.filters`: the 1×1
projections are the block's own ``ConvNd`` modules called on the ``(B, C, *S)`` input, as public code does.

Papers and the formulation each public implementation uses:

- NL, NS and the kernels of Wang et al., "Non-local Neural Networks", CVPR 2018 (arXiv:1711.07971), §3.2-3.3:
  ``θ``, ``φ``, ``g`` as convolutions, ``f = θᵀφ`` materialized ``(B, N, N')``, ``softmax`` / ``f/N`` /
  ``relu(w·[θ_i; φ_j])`` (the concatenation is materialized as a ``(B, 2C_k, N, N')`` tensor, as in Wang et
  al.'s Caffe2 code and its PyTorch ports), sub-sampling by max-pooling ``φ`` and ``g``, ``y = BN(W(f g)) + x``.
  NS: Tao et al., "Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal Modeling", NeurIPS 2018, Eq. 8,
  ``(A − I) g``.
- SNL, gSNL, Chebyshev SNL: Zhu et al., "A Spectral Nonlocal Block for Neural Networks", ICLR 2020 submission
  (OpenReview rkgb9kSKwS), Eq. 8 and 10; Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021,
  Eq. 3-5: the affinity ``relu(θ)ᵀ relu(φ)`` formed, symmetrized, ``D^-1/2 M̂ D^-1/2`` by broadcasting, the
  Chebyshev terms by repeated ``bmm`` with the formed ``A``.
- A²: Chen et al., "A²-Nets: Double Attention Networks", NeurIPS 2018, Eq. 1-4: gather ``G = Z softmax_N(φ)ᵀ``
  (``C_v × C_k``), distribute ``G softmax_C(θ)`` — two ``bmm`` on ``(B, C, N)`` views, no ``N × N``.
- CGNL: Yue et al., "Compact Generalized Non-local Network", NeurIPS 2018, §3 (the authors' ``kernel``
  method): per group, ``att = bmm(p, g)`` over the ``C_g·N`` nodes, ``y = bmm(att, t)`` (Taylor features for the
  Gaussian RBF), then the grouped 1×1 conv, GroupNorm, residual.
- CC: Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019, Eq. 1-2 (the
  pure-PyTorch form): energies over the column and the row by ``einsum``, the query itself masked on one of them,
  one softmax over their concatenation, outputs by ``einsum``, ``y = γ·out + x``, applied ``R`` times.
- GC: Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019 (arXiv
  1904.11492), Eq. 4 (mmcv's ``ContextBlock``): ``softmax(w_m x)`` pooling by ``bmm``, the bottleneck on
  ``(B, C, 1, 1)``, fusion by addition (and/or a sigmoid gate).
- APNB: Zhu, Xu, Huang, Bai, "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV 2019 (the
  authors' ``PSPModule`` / ``_SelfAttentionBlock``): keys and values projected, then ``adaptive_avg_pool`` to each
  pyramid size, flattened and concatenated, ``softmax(θᵀ psp(φ) / √C_k)`` formed ``(B, N, N')``.
- External Attention: Guo, Liu, Mu, Hu, TPAMI 2022 (EANet's ``External_attention``): ``conv1``, ``linear_0`` as a
  ``conv1d``, softmax over the positions, ``/ (1e-9 + sum over the slots)``, ``linear_1``, ``conv2`` + BN.
- Agent Attention: Han et al., ECCV 2024 (the authors' ``AgentAttention`` for one head, no depthwise conv or
  position biases): agents ``adaptive_avg_pool`` of the query map, ``softmax(Ag Kᵀ) V`` then ``softmax(Q Agᵀ)`` of
  that, both by ``matmul`` on ``(B, N, C)`` tokens.
- DNL: Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020 (arXiv 2006.06668), Eq. 12: whitened
  ``θ``, ``φ`` by their means over positions, ``softmax(θᵀφ / (√C_k τ))`` formed, plus the unary
  ``softmax(w_m x)`` pooled by ``bmm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CASES", "naive_forward"]

# The cases `--baseline naive` measures: name -> (preset, options). The presets as they are, plus the variants of
# the public comparison (Wang et al.'s kernels with and without sub-sampling; CGNL with 8 groups).
CASES: dict[str, tuple[str, dict]] = {
    "nl": ("nl", {}),
    "nl/sub": ("nl", {"sub_sample": True}),
    "nl-dot": ("nl", {"kernel": "dot_product"}),
    "nl-dot/sub": ("nl", {"kernel": "dot_product", "sub_sample": True}),
    "nl-gauss": ("nl", {"kernel": "gaussian"}),
    "nl-gauss/sub": ("nl", {"kernel": "gaussian", "sub_sample": True}),
    "nl-concat/sub": ("nl", {"kernel": "concatenation", "sub_sample": True}),
    "ns": ("ns", {}),
    "snl": ("snl", {}),
    "gsnl": ("gsnl", {}),
    "cheby": ("cheby", {}),
    "a2": ("a2", {}),
    "cgnl": ("cgnl", {}),
    "cgnl/g8": ("cgnl", {"groups": 8}),
    "cc": ("cc", {}),
    "gc": ("gc", {}),
    "dnl": ("dnl", {}),
    "apnb": ("apnb", {}),
    "external": ("external", {}),
    "agent": ("agent", {}),
}


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Wang et al.'s sub-sampling: max-pool 2 (1-D), (2, 2) (2-D), (1, 2, 2) (3-D) on ``(B, C, *S)``."""
    if t.dim() == 3:
        return F.max_pool1d(t, 2)
    if t.dim() == 4:
        return F.max_pool2d(t, (2, 2))
    return F.max_pool3d(t, (1, 2, 2))


def _norm(unit, f: torch.Tensor) -> torch.Tensor:
    """The output norm on ``(B, C, *S)``, as public code applies it (``BatchNormNd``, ``GroupNorm``, ``γ``)."""
    n = unit.norm
    if n.kind in ("bn", "bn_relu"):
        bn = n.bn
        y = F.batch_norm(f, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         bn.training or not bn.track_running_stats, 0.1 if bn.momentum is None else bn.momentum, bn.eps)
        return F.relu(y) if n.kind == "bn_relu" else y
    if n.kind == "gn":
        return F.group_norm(f, n.gn.num_groups, n.gn.weight, n.gn.bias, n.gn.eps)
    if n.kind == "gamma":
        return n.gamma * f
    return f


def _position_affinity(e, h: torch.Tensor) -> torch.Tensor:
    """``A`` ``(B, N, N')`` formed, Wang et al. / Zhu et al. / Yin et al. style."""
    b = h.shape[0]
    if e.theta is not None:
        theta, phi = e.theta(h), e.phi(h)
    else:  # Wang et al.'s Gaussian: the raw features
        theta = phi = h
    if e.sub_sample:
        phi = _pool(phi)
    ck = theta.shape[1]
    theta_x = theta.reshape(b, ck, -1).permute(0, 2, 1)  # (B, N, C_k)
    phi_x = phi.reshape(b, ck, -1)  # (B, C_k, N')
    if e.whiten:
        theta_x = theta_x - theta_x.mean(1, keepdim=True)
        phi_x = phi_x - phi_x.mean(2, keepdim=True)
    kern, norm = e.kernel, e.normalization
    if kern == "concatenation":
        n, nk = theta_x.shape[1], phi_x.shape[2]
        tc = theta_x.permute(0, 2, 1).reshape(b, ck, n, 1).repeat(1, 1, 1, nk)
        pc = phi_x.reshape(b, ck, 1, nk).repeat(1, 1, n, 1)
        f = F.relu(F.conv2d(torch.cat([tc, pc], 1), e.concat.weight.reshape(1, 2 * ck, 1, 1))).reshape(b, n, nk)
    else:
        if kern == "relu_dot":
            theta_x, phi_x = F.relu(theta_x), F.relu(phi_x)
        f = torch.matmul(theta_x, phi_x)
        if e.scale_value != 1.0 and kern in ("embedded_gaussian", "gaussian"):
            f = f * e.scale_value
        if kern in ("embedded_gaussian", "gaussian"):
            if norm == "softmax":
                return F.softmax(f, dim=-1)
            f = torch.exp(f - f.amax(dim=(1, 2), keepdim=True)) if norm == "symmetric" else torch.exp(f)
    if norm == "count":
        return f / f.shape[-1]
    if norm in ("row", "softmax"):
        d = f.sum(-1, keepdim=True)
        return torch.where(d != 0, f / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(f))
    if norm == "symmetric":  # the official SNL code: (M + Mᵀ)/2, d^-1/2 where d > 0
        f = (f + f.permute(0, 2, 1)) / 2
        d = f.sum(-1)
        pos = d > 0
        d = torch.where(pos, torch.where(pos, d, torch.ones_like(d)).rsqrt(), torch.zeros_like(d))
        return f * d.unsqueeze(1) * d.unsqueeze(2)
    return f


def _positions(block, x: torch.Tensor) -> torch.Tensor:
    """NL, NS, SNL, gSNL, Chebyshev, DNL and every kernel of Wang et al.: ``A`` formed, terms by ``bmm``."""
    e = block.edges
    b, spatial = x.shape[0], x.shape[2:]
    h = x
    for _ in range(block.recurrence):
        a = _position_affinity(e, h)
        if e.unary:  # DNL's unary term: softmax(w_m x) pooled by bmm, broadcast over the queries
            a_unary = F.softmax(e.mask(h).reshape(b, 1, -1), dim=-1)
        for unit in block.units:
            g = unit.g(h) if unit.g is not None else h
            cv = g.shape[1]
            g_x = g.reshape(b, cv, -1).permute(0, 2, 1)  # (B, N, C_v)
            g_keys = _pool(g).reshape(b, cv, -1).permute(0, 2, 1) if e.sub_sample else g_x
            rows = unit.coef_rows
            order = max([0] + [k for r in rows for k, c in enumerate(r) if c != 0])
            basis = [g_x]
            if order >= 1:
                y1 = torch.bmm(a, g_keys)
                if e.unary:
                    y1 = y1 + torch.bmm(a_unary, g_keys)
                basis.append(y1)
            for _ in range(2, order + 1):
                basis.append(2 * torch.bmm(a, basis[-1]) - basis[-2])
            f = None
            for row, w in zip(rows, unit.w):
                term = sum(c * basis[k] for k, c in enumerate(row[: order + 1]) if c != 0)
                out = w(term.permute(0, 2, 1).reshape(b, cv, *spatial))
                f = out if f is None else f + out
            h = _norm(unit, f) + h
    return h


def _a2(block, x: torch.Tensor) -> torch.Tensor:
    """Chen et al.'s double attention: gather then distribute, two bmm on (B, C, N) views."""
    e, unit = block.edges, block.units[0]
    b = x.shape[0]
    feats = unit.g(x).reshape(b, -1, x[0, 0].numel())  # A: (B, C_v, N)
    attn_maps = F.softmax(e.phi(x).reshape(b, -1, feats.shape[-1]), dim=-1)  # B: (B, C_k, N), over positions
    attn_vecs = F.softmax(e.theta(x).reshape(b, -1, feats.shape[-1]), dim=1)  # V: (B, C_k, N), over channels
    global_desc = torch.bmm(feats, attn_maps.permute(0, 2, 1))  # (B, C_v, C_k)
    z = global_desc.bmm(attn_vecs).reshape(b, -1, *x.shape[2:])  # (B, C_v, *S)
    return _norm(unit, unit.w[0](z)) + x


def _cgnl(block, x: torch.Tensor) -> torch.Tensor:
    """Yue et al.'s CGNL, the authors' kernel: per group, ``att = bmm(p, g)``, ``y = bmm(att, t)``."""
    e, unit = block.edges, block.units[0]
    b = x.shape[0]
    t, p, g = e.theta(x), e.phi(x), unit.g(x)
    if e.sub_sample:
        p, g = _pool(p), _pool(g)
    groups = e.groups
    cg = t.shape[1] // groups
    outs = []
    for ti, pi, gi in zip(t.split(cg, 1), p.split(cg, 1), g.split(cg, 1)):
        nodes = pi[0].numel()
        if e.kernel == "dot_product":
            tk, pk = [ti.reshape(b, 1, -1)], [pi.reshape(b, 1, -1)]
        else:  # the Taylor expansion of the RBF, one feature map per order
            gam = e.rbf_gamma
            tk, pk = [], []
            for k in range(e.order + 1):
                alpha = math.sqrt((2 * gam) ** k / math.factorial(k))
                tk.append(alpha * ti.reshape(b, 1, -1) ** k)
                pk.append(alpha * pi.reshape(b, 1, -1) ** k)
            if e.rbf_prefactor == "exact":
                tk = [torch.exp(-gam * ti.reshape(b, 1, -1) ** 2) * v for v in tk]
                pk = [torch.exp(-gam * pi.reshape(b, 1, -1) ** 2) * v for v in pk]
            else:
                tk = [math.exp(-gam) * v for v in tk]
                pk = [math.exp(-gam) * v for v in pk]
        tt, pp = torch.cat(tk, 1), torch.cat(pk, 1)  # (B, K, C_g·N)
        att = torch.bmm(pp, gi.reshape(b, -1, 1))  # (B, K, 1)
        if e.normalization == "count":
            att = att / nodes
        if e.scale is True:
            att = att / math.sqrt(nodes)
        elif e.scale is not False:
            att = att * float(e.scale)
        y = torch.bmm(att.permute(0, 2, 1), tt)  # (B, 1, C_g·N)
        outs.append(y.reshape(b, cg, *x.shape[2:]))
    z = torch.cat(outs, 1)
    return _norm(unit, unit.w[0](z)) + x


def _cc(block, x: torch.Tensor) -> torch.Tensor:
    """CCNet's criss-cross attention in pure PyTorch: einsum energies over column and row, one softmax."""
    if x.dim() != 4:
        raise ValueError("the naive criss-cross baseline is 2-D (CCNet's), got a "
                         f"{x.dim() - 2}-D input")
    e = block.edges
    height = x.shape[2]
    h = x
    for _ in range(block.recurrence):
        q, k = e.theta(h), e.phi(h)
        energy_h = torch.einsum("bchw,bckw->bhwk", q, k)  # (B, H, W, H)
        energy_h = energy_h.masked_fill(torch.eye(height, dtype=torch.bool, device=x.device)[:, None, :],
                                        float("-inf"))
        energy_w = torch.einsum("bchw,bchk->bhwk", q, k)  # (B, H, W, W)
        att = F.softmax(torch.cat([energy_h, energy_w], -1) * e.scale_value, dim=-1)
        att_h, att_w = att[..., :height], att[..., height:]
        for unit in block.units:
            v = unit.g(h) if unit.g is not None else h
            out = torch.einsum("bhwk,bckw->bchw", att_h, v) + torch.einsum("bhwk,bchk->bchw", att_w, v)
            h = _norm(unit, out) + h
    return h


def _gc(block, x: torch.Tensor) -> torch.Tensor:
    """mmcv's ContextBlock: attention pooling by bmm, the bottleneck on (B, C, 1, 1), add and/or gate."""
    e, unit = block.edges, block.units[0]
    b, c = x.shape[:2]
    mask = F.softmax(e.mask(x).reshape(b, 1, -1), dim=-1)  # (B, 1, N)
    ctx = torch.bmm(x.reshape(b, c, -1), mask.permute(0, 2, 1)).reshape(b, c, *([1] * (x.dim() - 2)))

    def transform(m):
        t = m.conv1(ctx)
        t = F.layer_norm(t.movedim(1, -1), m.norm.normalized_shape, m.norm.weight, m.norm.bias, m.norm.eps)
        return m.conv2(F.relu(t.movedim(-1, 1)))

    y = x
    if "mul" in unit.fusion:
        y = y * torch.sigmoid(transform(unit.w_mul[0]))
    if "add" in unit.fusion:
        y = y + _norm(unit, transform(unit.w[0]))
    return y


_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _one_nl_unit(block, what: str) -> None:
    unit = block.units[0]
    if len(block.units) != 1 or block.recurrence != 1 or unit.coef_rows != ((0.0, 1.0),) or not len(unit.w):
        raise ValueError(f"the naive {what} baseline is one unit with the 'nl' filter and its output map (the "
                         "authors' block)")


def _apnb(block, x: torch.Tensor) -> torch.Tensor:
    """APNB: project, then pyramid-pool the keys and values (the authors' PSPModule), softmax formed."""
    e, unit = block.edges, block.units[0]
    _one_nl_unit(block, "APNB")
    if e.kernel != "embedded_gaussian" or e.normalization not in ("softmax", "row"):
        raise ValueError("the naive APNB baseline is its embedded Gaussian softmax")
    b, d = x.shape[0], x.dim() - 2

    def psp(t):
        return torch.cat([_ADAPTIVE[d](t, (s,) * d).reshape(b, t.shape[1], -1) for s in e.pool_sizes], -1)

    value = psp(unit.g(x)).permute(0, 2, 1)  # (B, S, C_v)
    query = e.theta(x).reshape(b, e.theta.out_channels, -1).permute(0, 2, 1)  # (B, N, C_k)
    sim = F.softmax(e.scale_value * torch.matmul(query, psp(e.phi(x))), dim=-1)  # (B, N, S)
    context = torch.matmul(sim, value).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
    return _norm(unit, unit.w[0](context)) + x


def _external(block, x: torch.Tensor) -> torch.Tensor:
    """External Attention as EANet computes it (channels-first, the memories as 1-D convolutions)."""
    e, unit = block.edges, block.units[0]
    _one_nl_unit(block, "External Attention")
    b = x.shape[0]
    t = e.theta(x).reshape(b, e.theta.out_channels, -1)  # (B, C_k, N)
    attn = F.conv1d(t, e.memory.weight.reshape(*e.memory.weight.shape[:2], 1))  # (B, S, N)
    if e.scale_value != 1.0:
        attn = attn * e.scale_value
    attn = F.softmax(attn, dim=-1)
    attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
    z = F.conv1d(attn, unit.memory.weight.reshape(*unit.memory.weight.shape[:2], 1))  # (B, C_v, N)
    return _norm(unit, unit.w[0](z.reshape(b, -1, *x.shape[2:]))) + x


def _agent(block, x: torch.Tensor) -> torch.Tensor:
    """Agent Attention, one head, as the authors' AgentAttention computes it (without its dwc and biases)."""
    e, unit = block.edges, block.units[0]
    _one_nl_unit(block, "Agent Attention")
    b = x.shape[0]
    qm, km, vm = e.theta(x), e.phi(x), unit.g(x)
    if e.sub_sample:
        km, vm = _pool(km), _pool(vm)
    q, k, v = (t.reshape(b, t.shape[1], -1).permute(0, 2, 1) for t in (qm, km, vm))  # (B, N, C)
    agents = _ADAPTIVE[x.dim() - 2](qm, e.agent_grid).reshape(b, qm.shape[1], -1).permute(0, 2, 1)  # (B, n, C)
    s = e.scale_value
    agent_v = torch.matmul(F.softmax(torch.matmul(agents * s, k.transpose(1, 2)), dim=-1), v)  # (B, n, C_v)
    out = torch.matmul(F.softmax(torch.matmul(q * s, agents.transpose(1, 2)), dim=-1), agent_v)  # (B, N, C_v)
    return _norm(unit, unit.w[0](out.permute(0, 2, 1).reshape(b, -1, *x.shape[2:]))) + x


def naive_forward(block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` computed the way the preset's public code computes it (module docstring), with the block's
    weights. Supports what the presets and :data:`CASES` use; anything else is a ``ValueError``."""
    name, e = block.name, block.edges
    unit = block.units[0]
    if any(getattr(u, "spectral", None) is not None for u in block.units):
        raise ValueError(f"{name!r}: no naive baseline for the spectral filters (Cayley, heat, wavelet); their "
                         "dense formulation (eigh) is measured by `nonlocalnet bench --spectral`")
    if getattr(unit, "out_map", "linear") == "bottleneck" or e.kernel == "unary":
        if name != "gc" and e.kernel != "unary":
            raise ValueError("the naive baseline has GCNet's bottleneck only with its unary pooling (gc)")
        return _gc(block, x)
    if any(u.fusion != "add" for u in block.units):
        raise ValueError("the naive baseline fuses by addition except for gc")
    if e.mode == "channels":
        return _cgnl(block, x)
    if e.mode == "crisscross":
        return _cc(block, x)
    if e.mode == "memory":
        return _external(block, x)
    if e.mode == "agents":
        return _agent(block, x)
    if getattr(e, "pool_sizes", None) is not None:
        return _apnb(block, x)
    if e.kernel == "double_attention":
        if len(block.units) != 1 or block.recurrence != 1 or unit.coef_rows != ((0.0, 1.0),):
            raise ValueError("the naive A² baseline is one unit with the 'nl' filter (Chen et al.'s block)")
        return _a2(block, x)
    if not len(unit.w):
        raise ValueError("the naive baseline of a position graph needs out_proj=True")
    return _positions(block, x)
