"""Dense, literal implementations of the equations: the ground truth every fast path is tested against.

Nothing here is fast and nothing here shares code with :mod:`affinity` / :mod:`filters` /
:mod:`blocks`: every ``N × N`` matrix is formed, every polynomial ``T_k(A)`` is a matrix, masks are
built by loops. :func:`forward` recomputes a block's output from its parameters alone.

Papers cited here (short form first):

- Tao et al. 2018: Y. Tao, Q. Sun, Q. Du, W. Liu, "Nonlocal Neural Networks, Nonlocal Diffusion and
  Nonlocal Modeling", NeurIPS 2018, arXiv:1806.00681.
- Zhu et al. 2021 (ICCV): L. Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021,
  arXiv:2108.02451 (equation and section numbers as in its submitted version, "A Unified Framework to
  Analyze and Design the Nonlocal Blocks for Neural Networks"; code: the SNL_ICCV2021 repository).

Equations (docs/framework.md and these papers):

- kernels: ``exp(θ_i·φ_j)`` (embedded Gaussian), ``exp(x_i·x_j)`` (Gaussian), ``θ_i·φ_j``,
  ``relu(θ_i)·relu(φ_j)``, ``relu(w·[θ_i; φ_j])``; A²: ``softmax_n(θ) softmax_N(φ)ᵀ`` (Zhu et al. 2021 (ICCV), §B.3)
- normalizations: ``D⁻¹M``, ``M/N'``, ``D̂^{-1/2} M̂ D̂^{-1/2}`` with ``M̂ = (M+Mᵀ)/2``
  (Zhu et al. 2021 (ICCV), Eq. 5)
- filter: ``F = Σ_t (Σ_k coef[t,k] T_k(A)) Z W_t``, ``T_k = 2A T_{k-1} − T_{k-2}``
  (Zhu et al. 2021 (ICCV), Eq. 3)
- stage: ``Zⁿ⁺¹ = Zⁿ + out_n(F_n(A, g_n(Zⁿ)))``, ``A`` from the stage input (Tao et al. 2018, Eq. 8)
- CC: softmax over the positions in the same row/column (mask ``C``, Zhu et al. 2021 (ICCV), §B.5)
- CGNL: graph over (position, channel) nodes (Zhu et al. 2021 (ICCV), §B.4)
- axial (Ho et al., "Axial Attention in Multidimensional Transformers", arXiv 2019; Wang et al., "Axial-DeepLab",
  ECCV 2020): ``A = A_{D-1} ··· A_0``, each ``A_d`` the row-normalized ``exp(s·qkᵀ)`` masked to the positions
  that differ only along axis ``d`` (mask by loops), the product formed as ``N × N``
- neighborhood (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023): the row-normalized
  ``exp(s·qkᵀ)`` masked to the ``k^d`` window of each query, shifted inward at the borders (mask by loops)
- spectral filters (docs/spectral.md), ``L = I − A``: heat ``exp(−tL)``, wavelet ``e·sL·exp(−sL)`` from
  ``torch.linalg.eigh`` of the dense symmetric ``A`` (``matrix_exp`` when ``A`` is not symmetric); Cayley
  ``C = (hL − iI)(hL + iI)⁻¹`` as a dense complex matrix, its powers by matmul (Levie et al., CayleyNets,
  IEEE TSP 2018)
- GC (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019,
  arXiv 1904.11492, Eq. 4): ``A = 1·aᵀ``, ``a = softmax(w_m X)``, the bottleneck ``conv → LayerNorm → ReLU →
  conv``, fusion ``X ⊙ σ(F_mul) + F_add``
- APNB (Zhu, Xu, Huang, Bai, "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV 2019,
  the pyramid sampling): keys and values averaged over the adaptive bins of each pyramid level, by loops
- External Attention (Guo, Liu, Mu, Hu, TPAMI 2022, the double normalization): ``M = exp(θ M_kᵀ)``, each column
  divided by its sum over the positions, then each row by ``1e-9 +`` its sum over the memory slots; ``F = A M_v W``
- Agent Attention (Han et al., ECCV 2024): agents ``Ag`` = the queries averaged over adaptive bins (loops),
  ``A = D⁻¹exp(s θ Agᵀ) · D⁻¹exp(s Ag φᵀ)``, both factors formed
- heads (Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.2.2): head ``i`` is the whole graph of
  the ``i``-th channel group of θ, φ, each filter term formed per head on that head's channel group of ``Z``
  and the heads concatenated before ``W_t``
- DNL (Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020, arXiv 2006.06668, Eq. 12):
  ``softmax((θ−μ_θ)(φ−μ_φ)ᵀ/(√C_s τ)) + 1·softmax(w_m X)ᵀ``
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .kernels import DOUBLE_NORM_EPS, KERNELS

LIBRARY_SPECTRAL = ("cayley", "heat", "wavelet")  # the spectral filters whose literal forms are written out here


def conv_matrix(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A (possibly grouped) 1×1 conv weight ``(C_out, C_in/G, 1, ..)`` as the dense ``C_out × C_in`` matrix it
    applies (block diagonal for ``G > 1``: output group ``g`` reads input group ``g``)."""
    w = weight.reshape(weight.shape[0], -1)
    cout, cin_g = w.shape
    g = in_channels // cin_g
    if g == 1:
        return w
    full = torch.zeros(cout, in_channels, dtype=w.dtype, device=w.device)
    og = cout // g
    for i in range(g):
        full[i * og:(i + 1) * og, i * cin_g:(i + 1) * cin_g] = w[i * og:(i + 1) * og]
    return full


def _mat(conv) -> torch.Tensor:
    return conv_matrix(conv.weight, conv.in_channels)


def _lin(conv, x: torch.Tensor) -> torch.Tensor:
    y = x @ _mat(conv).T
    return y + conv.bias if conv.bias is not None else y


def pool(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Max over each (2)/(2,2)/(1,2,2) window, dropping a trailing odd row (floor), by explicit loops."""
    b, _, c = t.shape
    grid = t.reshape(b, *spatial, c)
    win = (2,) if len(spatial) == 1 else (2, 2) if len(spatial) == 2 else (1, 2, 2)
    out_shape = [s // w for s, w in zip(spatial, win)]
    out = torch.empty(b, *out_shape, c, dtype=t.dtype)
    for idx in itertools.product(*[range(s) for s in out_shape]):
        sl = tuple(slice(i * w, i * w + w) for i, w in zip(idx, win))
        window = grid[(slice(None), *sl)].reshape(b, -1, c)
        out[(slice(None), *idx)] = window.max(1).values
    return out.reshape(b, -1, c)


def adaptive_pool(t: torch.Tensor, spatial: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling by explicit loops: the mean over each bin of ``grid`` (row-major), bin ``i`` of an
    axis of length ``L`` pooled to ``s`` covering ``[floor(i·L/s), ceil((i+1)·L/s))``."""
    b, _, c = t.shape
    g = t.reshape(b, *spatial, c)
    out = []
    for idx in itertools.product(*[range(s) for s in grid]):
        sl = tuple(slice((i * n) // s, -((-(i + 1) * n) // s)) for i, n, s in zip(idx, spatial, grid))
        window = g[(slice(None), *sl)].reshape(b, -1, c)
        out.append(window.sum(1) / window.shape[1])
    return torch.stack(out, 1)


def pyramid_pool(t: torch.Tensor, spatial: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """APNB's pyramid sampling (Zhu, Xu, Huang, Bai, ICCV 2019): for each ``s`` in ``sizes`` the
    ``s^d`` adaptive bins (:func:`adaptive_pool`), the sizes one after the other."""
    return torch.cat([adaptive_pool(t, spatial, (s,) * len(spatial)) for s in sizes], 1)


def sample_keys(t: torch.Tensor, spatial: tuple[int, ...], pool_sizes: tuple[int, ...] | None) -> torch.Tensor:
    """Sub-sampled keys: Wang et al.'s max-pool (``pool_sizes=None``) or APNB's pyramid."""
    return pool(t, spatial) if pool_sizes is None else pyramid_pool(t, spatial, pool_sizes)


def normalize(m: torch.Tensor, normalization: str) -> torch.Tensor:
    """The normalization table of docs/framework.md ("Step 1"), literally."""
    if normalization in ("softmax", "row"):
        d = m.sum(-1, keepdim=True)
        return torch.where(d != 0, m / torch.where(d != 0, d, 1), 0)
    if normalization == "count":
        return m / m.shape[-1]
    if normalization == "symmetric":
        mh = (m + m.transpose(1, 2)) / 2
        d = mh.sum(-1)
        dinv = torch.where(d > 0, torch.where(d > 0, d, 1) ** -0.5, 0)
        return torch.diag_embed(dinv) @ mh @ torch.diag_embed(dinv)
    if normalization == "none":
        return m
    if normalization == "double":  # External Attention: over the queries (positions), then l1 over the keys
        c = m / m.sum(1, keepdim=True)
        return c / (DOUBLE_NORM_EPS + c.sum(-1, keepdim=True))
    raise ValueError(normalization)


def crisscross_mask(spatial: tuple[int, ...]) -> torch.Tensor:
    """``mask[i, j]`` is True when positions i and j differ in at most one coordinate (loops)."""
    coords = list(itertools.product(*[range(s) for s in spatial]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            mask[i, j] = sum(a != b for a, b in zip(ci, cj)) <= 1
    return mask


def axis_mask(spatial: tuple[int, ...], axis: int) -> torch.Tensor:
    """``mask[i, j]`` is True when positions i and j agree in every coordinate but ``axis`` (loops)."""
    coords = list(itertools.product(*[range(s) for s in spatial]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            mask[i, j] = all(a == b for d, (a, b) in enumerate(zip(ci, cj)) if d != axis)
    return mask


def neighborhood_mask(spatial: tuple[int, ...], kernel_size: int) -> torch.Tensor:
    """``mask[i, j]`` is True when j lies in the window of i: along each axis, the ``k`` positions starting at
    ``min(max(i - k // 2, 0), L - k)`` (NAT's window, shifted inward at the borders) (loops)."""
    coords = list(itertools.product(*[range(s) for s in spatial]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, ci in enumerate(coords):
        starts = [min(max(a - kernel_size // 2, 0), length - kernel_size) for a, length in zip(ci, spatial)]
        for j, cj in enumerate(coords):
            mask[i, j] = all(s0 <= b < s0 + kernel_size for s0, b in zip(starts, cj))
    return mask


def axial_affinity(logits: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Axial attention from the logits ``s·q_i·k_j`` ``(B, N, N)``: the dense per-axis softmax matrices
    ``A_d = rownorm(exp(logits) ⊙ mask_d)``, multiplied as ``N × N``: ``A = A_{D-1} ··· A_1 A_0`` (the first
    axis applied first)."""
    a = None
    for d in range(len(spatial)):
        ad = normalize(torch.exp(logits) * axis_mask(spatial, d).to(logits.dtype), "row")
        a = ad if a is None else ad @ a
    return a


class _Head:
    """Head ``i`` of ``h`` of an :class:`~nonlocalnet.blocks.Affinity` module: its attributes, and ``head``."""

    def __init__(self, graph, i: int, h: int):
        self._graph, self.head = graph, (i, h)

    def __getattr__(self, name):
        return getattr(self._graph, name)


def affinity_heads(graph, x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Multi-head ``A`` (B, h, N, N'): head ``i`` is the graph of the ``i``-th of ``h`` equal channel groups of
    the queries and keys (Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.2.2), each formed as a
    whole dense graph by :func:`affinity_tokens` (the unary term, if any, added to each)."""
    h = getattr(graph, "heads", 1)
    return torch.stack([affinity_tokens(_Head(graph, i, h), x, spatial) for i in range(h)], 1)


def split_heads(z: torch.Tensor, h: int) -> torch.Tensor:
    """``(B, N, c) -> (B·h, N, c/h)``: head ``i`` takes channels ``[i·c/h, (i+1)·c/h)``."""
    b, n, c = z.shape
    return z.reshape(b, n, h, c // h).permute(0, 2, 1, 3).reshape(b * h, n, c // h)


def merge_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """The inverse of :func:`split_heads`: the heads' channels concatenated."""
    bh, n, ch = t.shape
    return t.reshape(bh // h, h, n, ch).permute(0, 2, 1, 3).reshape(bh // h, n, h * ch)


def affinity_tokens(graph, x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Dense ``A`` (B, N, N') of an :class:`~nonlocalnet.blocks.Affinity` module on tokens ``x``; with ``heads >
    1`` the mean of the heads' graphs (what ``block.affinity`` gives for analysis; :func:`affinity_heads`)."""
    if getattr(graph, "heads", 1) > 1 and not hasattr(graph, "head"):
        return affinity_heads(graph, x, spatial).mean(1)
    kernel, norm = graph.kernel, graph.normalization
    if getattr(graph, "memory", None) is not None:  # External Attention: the keys are the memory rows M_k
        q = _lin(graph.theta, x)
        k = _mat(graph.memory)[None].expand(x.shape[0], -1, -1)  # (B, S, C_k)
        return normalize(KERNELS[kernel].literal(q, k, graph.scale_value), norm)
    if getattr(graph, "agent_grid", None) is not None:  # Agent Attention: queries -> agents -> keys
        q, k = _lin(graph.theta, x), _lin(graph.phi, x)
        if graph.sub_sample:
            k = sample_keys(k, spatial, graph.pool_sizes)
        ag = adaptive_pool(q, spatial, graph.agent_grid)  # (B, n, C_s)
        lit, s = KERNELS[kernel].literal, graph.scale_value
        return normalize(lit(q, ag, s), "row") @ normalize(lit(ag, k, s), "row")
    if graph.theta is not None:
        q, k = _lin(graph.theta, x), _lin(graph.phi, x)
    else:
        q, k = x, x
    if graph.sub_sample:
        k = sample_keys(k, spatial, getattr(graph, "pool_sizes", None))
    if getattr(graph, "whiten", False):
        q = q - q.sum(1, keepdim=True) / q.shape[1]
        k = k - k.sum(1, keepdim=True) / k.shape[1]
    if hasattr(graph, "head"):  # one head: its channel group of the queries and keys
        i, h = graph.head
        width = q.shape[-1] // h
        q, k = q[..., i * width:(i + 1) * width], k[..., i * width:(i + 1) * width]
    s = graph.scale_value
    unary = None
    if graph.mask is not None:  # the unary term: M_ij = exp(m_j), the same row for every query
        logits = _lin(graph.mask, x)[..., 0]  # (B, N)
        unary = torch.exp(logits)[:, None, :] * torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
    if KERNELS[kernel].unary:
        return normalize(unary, "row")
    a_unary = 0 if unary is None else normalize(unary, "row")
    if getattr(graph, "approx", None) is not None:  # a softmax approximation, formed densely
        pairwise = approximate_affinity(graph, q, k, s)
        if getattr(graph, "gamma", None) is not None:  # the DNL authors' γ, as below
            pairwise = graph.gamma.to(pairwise.dtype) * pairwise
        return pairwise + a_unary
    if graph.mode == "crisscross":
        logits = s * q @ k.transpose(1, 2)
        m = torch.exp(logits) * crisscross_mask(spatial).to(logits.dtype)
        return normalize(m, "row")
    if graph.mode == "axial":
        return axial_affinity(s * q @ k.transpose(1, 2), spatial)
    if graph.mode == "neighborhood":
        m = torch.exp(s * q @ k.transpose(1, 2)) * neighborhood_mask(spatial, graph.kernel_size).to(q.dtype)
        return normalize(m, "row")
    if graph.concat is not None:
        w = graph.concat.weight.flatten()
        n, nk, c = q.shape[1], k.shape[1], q.shape[2]
        m = torch.empty(x.shape[0], n, nk, dtype=x.dtype)
        for i in range(n):
            for j in range(nk):
                m[:, i, j] = F.relu(torch.cat([q[:, i], k[:, j]], -1) @ w)
        del c
    else:  # every other kernel: its literal formula (docs/framework.md "Step 1"), entry by entry as a product
        m = KERNELS[kernel].literal(q, k, s)
    pairwise = normalize(m, norm)
    if getattr(graph, "gamma", None) is not None:  # the DNL authors' A = γ·A_pairwise + 1·aᵀ
        pairwise = graph.gamma.to(pairwise.dtype) * pairwise
    return pairwise + a_unary


def performer_affinity(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (FAVOR+, positive random features):
    ``M̂_ij = φ(√s q_i)·φ(√s k_j)``, ``φ(x) = exp(Wx − ‖x‖²/2)/√m`` with the block's features ``W`` ``(m, d)``, the
    random-feature estimate of ``exp(s q_i·k_j)``; ``A = D⁻¹ M̂`` (the ``N × N'`` matrix formed, no stabilizer)."""
    m = w.shape[0]

    def phi(x):
        x = math.sqrt(s) * x
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    return normalize(phi(q) @ phi(k).transpose(1, 2), "row")


def landmarks(t: torch.Tensor, m: int) -> torch.Tensor:
    """Segment means, by a loop over the segments: the first ``(⌊N/m⌋+1)·m − N`` segments have ``⌊N/m⌋``
    positions, the others one more (all of them ``N/m`` when ``m`` divides ``N``)."""
    n = t.shape[1]
    lengths = [n // m] * m if n % m == 0 else \
        [n // m] * ((n // m + 1) * m - n) + [n // m + 1] * (m - ((n // m + 1) * m - n))
    out, start = [], 0
    for length in lengths:
        out.append(t[:, start:start + length].sum(1) / length)
        start += length
    return torch.stack(out, 1)


def nystrom_affinity(q: torch.Tensor, k: torch.Tensor, m: int, s: float, iterations: int = 6) -> torch.Tensor:
    """Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021:
    ``A = softmax(s Q K̃ᵀ) Z softmax(s Q̃ Kᵀ)`` with ``Z`` the paper's iterative Moore-Penrose pseudo-inverse of
    ``S = softmax(s Q̃ K̃ᵀ)``: ``Z_0 = Sᵀ/(‖S‖_1 ‖S‖_∞)``, ``Z_{j+1} = ¼ Z_j (13I − S Z_j (15I − S Z_j (7I − S Z_j)))``,
    6 iterations (the ``N × N'`` matrix formed)."""
    ql, kl = landmarks(q, m), landmarks(k, m)
    f1 = normalize(torch.exp(s * q @ kl.transpose(1, 2)), "row")
    f2 = normalize(torch.exp(s * ql @ kl.transpose(1, 2)), "row")
    f3 = normalize(torch.exp(s * ql @ k.transpose(1, 2)), "row")
    norm1 = f2.abs().sum(1).amax(-1)  # max column sum
    norm_inf = f2.abs().sum(2).amax(-1)  # max row sum (1 for a softmax)
    z = f2.transpose(1, 2) / (norm1 * norm_inf)[:, None, None]
    eye = torch.eye(m, dtype=f2.dtype)
    for _ in range(iterations):
        sz = f2 @ z
        z = z @ (13 * eye - sz @ (15 * eye - sz @ (7 * eye - sz))) / 4
    return f1 @ z @ f3


def approximate_affinity(graph, q: torch.Tensor, k: torch.Tensor, s: float) -> torch.Tensor:
    """The dense ``A`` of a block's softmax approximation (``approx``) from its queries and keys."""
    if graph.approx == "performer":
        return performer_affinity(q, k, graph.random_features, s)
    return nystrom_affinity(q, k, graph.approx_features, s)


def chebyshev_matrices(a: torch.Tensor, order: int) -> list[torch.Tensor]:
    """``[T_0(A), ..., T_K(A)]`` as dense matrices (needs a square ``A``)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    t = [eye, a]
    for _ in range(2, order + 1):
        t.append(2 * a @ t[-1] - t[-2])
    return t[: order + 1]


def spectral_matrices(a: torch.Tensor, name: str, order: int, scales: torch.Tensor, method: str = "eigh"
                      ) -> list[torch.Tensor]:
    """The dense ``B_t(A)`` (B, N, N) of each term of a spectral filter (heat, cayley, wavelet).

    ``method="eigh"``: ``f(A) = V f(Λ) Vᵀ`` from ``torch.linalg.eigh`` (needs a symmetric ``A``); ``"expm"``:
    ``torch.linalg.matrix_exp`` (any square ``A``; its gradients stay finite where ``A`` has repeated
    eigenvalues, e.g. the zeros of a low-rank ``A``). Cayley is always the dense complex transform.
    """
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype).expand_as(a)
    lap = eye - a
    if name == "cayley":
        h = scales[0]
        hl = (h * lap).to(torch.complex128)
        ieye = 1j * eye.to(torch.complex128)
        c = (hl - ieye) @ torch.linalg.inv(hl + ieye)
        out, p = [eye], eye.to(torch.complex128)
        for _ in range(order):
            p = p @ c
            out += [p.real, p.imag]
        return out
    if method == "eigh":
        lam, vec = torch.linalg.eigh(a)

        def heat(t):
            return vec @ torch.diag_embed(torch.exp(-t * (1 - lam))) @ vec.transpose(1, 2)
    else:
        def heat(t):
            return torch.linalg.matrix_exp(-t * lap)
    if name == "heat":
        return [eye] + [heat(scales[j]) for j in range(order)]
    out = [heat(scales[0])]
    for j in range(1, order + 1):
        out.append(math.e * scales[j] * lap @ heat(scales[j]))
    return out


def out_norm(norm_module, f: torch.Tensor) -> torch.Tensor:
    """The output normalization, literally: BN with batch statistics in train mode (no buffer update)."""
    kind = norm_module.kind
    if kind in ("bn", "bn_relu"):
        bn = norm_module.bn
        flat = f.reshape(-1, f.shape[-1])
        if bn.training:
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = (f - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        return F.relu(y) if kind == "bn_relu" else y
    if kind == "gn":
        gn = norm_module.gn
        b, n, c = f.shape
        g = gn.num_groups
        fg = f.reshape(b, n, g, c // g)
        mean = fg.mean(dim=(1, 3), keepdim=True)
        var = fg.var(dim=(1, 3), unbiased=False, keepdim=True)
        y = ((fg - mean) / torch.sqrt(var + gn.eps)).reshape(b, n, c)
        return y * gn.weight + gn.bias
    if kind == "gamma":
        return norm_module.gamma * f
    return f


def cgnl_channel_affinity(graph, x: torch.Tensor) -> torch.Tensor:
    """CGNL's graph on tokens ``x``: ``(B, G, N·C_g, N'·C_g)``, entry by entry from the kernel
    (Zhu et al. 2021 (ICCV), §B.4).

    Node ``(i, c)`` of group ``g`` is position ``i``, channel ``c``; ``M = k(θ_ic, φ_jc')`` with
    ``k(t, p) = t·p`` (dot) or ``exp(-γt²) exp(-γp²) Σ_{k≤P} (2γ)^k/k! (tp)^k`` (Gaussian RBF, Taylor P;
    ``exp(-2γ) Σ ...`` with ``rbf_prefactor="constant"``). ``scale``: True divides by ``sqrt(N'·C_g)``, a float
    multiplies.
    """
    t, p = _lin(graph.theta, x), _lin(graph.phi, x)
    b, n, c = t.shape
    g = graph.groups
    cg = c // g
    tg = t.reshape(b, n, g, cg).permute(0, 2, 1, 3).reshape(b, g, n * cg)
    pg = p.reshape(b, p.shape[1], g, cg).permute(0, 2, 1, 3).reshape(b, g, -1)
    tt, pp = tg[..., :, None], pg[..., None, :]
    if graph.kernel == "dot_product":
        m = tt * pp
    else:
        gam = graph.rbf_gamma
        series = sum((2 * gam) ** k / math.factorial(k) * (tt * pp) ** k for k in range(graph.order + 1))
        if graph.rbf_prefactor == "exact":
            m = torch.exp(-gam * tt**2) * torch.exp(-gam * pp**2) * series
        else:  # the CGNL authors' code: the constant exp(-2γ)
            m = math.exp(-2 * gam) * series
    nodes = pg.shape[-1]
    if graph.normalization == "count":
        m = m / nodes
    if graph.scale is True:
        m = m / math.sqrt(nodes)
    elif graph.scale is not False:
        m = m * float(graph.scale)
    return m


def _cgnl_apply(graph, x_tok: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    m = cgnl_channel_affinity(graph, x_tok)
    b, n, c = z.shape
    g = graph.groups
    zg = z.reshape(b, n, g, c // g).permute(0, 2, 1, 3).reshape(b, g, -1, 1)
    y = (m @ zg).reshape(b, g, n, c // g).permute(0, 2, 1, 3)
    return y.reshape(b, n, c)


def layer_norm(ln, t: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis, literally."""
    mean = t.sum(-1, keepdim=True) / t.shape[-1]
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / t.shape[-1]
    return (t - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def out_map(m, t: torch.Tensor) -> torch.Tensor:
    """A per-term output map: a 1×1 conv, or GCNet's ``conv2(relu(LN(conv1(t))))``."""
    if hasattr(m, "conv1"):
        return _lin(m.conv2, torch.clamp(layer_norm(m.norm, _lin(m.conv1, t)), min=0))
    return _lin(m, t)


def forward(block, x: torch.Tensor, spectral_method: str = "eigh") -> torch.Tensor:
    """A :class:`~nonlocalnet.blocks.NonlocalBlock`'s output, recomputed densely from its parameters.

    ``spectral_method``: how :func:`spectral_matrices` computes the spectral filters (``eigh`` or ``expm``).
    """
    b, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    h = x.movedim(1, -1).reshape(b, -1, c)
    graph = block.edges
    heads = getattr(graph, "heads", 1)
    for _ in range(block.recurrence):
        if heads > 1:  # every head its own graph on its channel group of Z: (B·h, N, N') and (B·h, N, C_v/h)
            a = affinity_heads(graph, h, spatial).flatten(0, 1)
        else:
            a = None if graph.mode == "channels" else affinity_tokens(graph, h, spatial)
        stage_input = h
        for unit in block.units:
            z = _lin(unit.g, h) if unit.g is not None else h
            if heads > 1:
                z = split_heads(z, heads)
            filt = unit.filter
            rows = filt.chebyshev()
            if rows is None:  # a matrix function of A
                if filt.name in LIBRARY_SPECTRAL and hasattr(filt, "log_scales"):  # positive scales exp(log_scales)
                    mats = spectral_matrices(a, filt.name, filt.order, torch.exp(filt.log_scales), spectral_method)
                else:  # a user's filter: its own literal form
                    mats = filt.literal(a)
                terms = [m @ z for m in mats]
            else:  # a polynomial, fixed or learnable: Σ_k coef[t, k] T_k(A) with the T_k formed as matrices
                coef = (rows if isinstance(rows, torch.Tensor) else torch.tensor(rows)).to(h.dtype)
                used = (coef != 0).any(0).nonzero()
                order = int(used.max()) if len(used) else 0
                if graph.mode == "channels":
                    zk = pool(z, spatial) if graph.sub_sample else z
                    basis = [z, _cgnl_apply(graph, stage_input, zk)]
                    assert order <= 1
                elif getattr(unit, "memory", None) is not None:  # the values at the memory slots: M_v
                    basis = [z, a @ _mat(unit.memory).T]
                elif graph.sub_sample:
                    basis = [z, a @ sample_keys(z, spatial, getattr(graph, "pool_sizes", None))]
                else:
                    basis = [t @ z for t in chebyshev_matrices(a, order)]
                terms = [sum(coef[t, k] * basis[k] for k in range(order + 1)) for t in range(coef.shape[0])]
            if heads > 1:  # the heads' outputs concatenated before the output maps
                terms = [merge_heads(t, heads) for t in terms]
            y = h
            if "mul" in unit.fusion:
                gate = sum(out_map(w, term) for w, term in zip(unit.w_mul, terms)) if len(unit.w_mul) else terms[0]
                y = y * (1 / (1 + torch.exp(-gate)))
            if "add" in unit.fusion:
                f = sum(out_map(w, term) for w, term in zip(unit.w, terms)) if len(unit.w) else terms[0]
                y = y + out_norm(unit.norm, f)
            h = y
    return h.reshape(b, *spatial, c).movedim(-1, 1)


def affinity(block, x: torch.Tensor) -> torch.Tensor:
    """Dense ``A`` of a block on input ``x`` (B, C, *S)."""
    b, c = x.shape[:2]
    return affinity_tokens(block.edges, x.movedim(1, -1).reshape(b, -1, c), tuple(x.shape[2:]))
