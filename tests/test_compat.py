"""nonlocalnet.compat against independent literal references of the public implementations.

``official_stage`` (the SNL authors' ``Stage``) and ``mmcv_nonlocal`` (mmcv's ``NonLocal1d/2d/3d``) below are
written from docs/framework.md ("The code behind the papers' numbers") on the raw state-dict tensors, with dense
N×N matrices and torch / torch.nn.functional only: no nonlocalnet code. BatchNorm and GroupNorm are written
out too (batch statistics, running-stat update with momentum 0.1 and the unbiased variance). float64, rtol 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _util import assert_close

from nonlocalnet.blocks import NonlocalBlock
from nonlocalnet.compat import MMCV_MODES, OFFICIAL_UNITS, from_mmcv, from_official_snl

DT = torch.float64
EPS, MOMENTUM = 1e-5, 0.1
BN = ("weight", "bias", "running_mean", "running_var")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT) * std


# --------------------------------------------------------------------------------------- references
def conv1x1(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 convolution on flattened positions: ``(B, Cin, N) -> (B, Cout, N)``."""
    y = torch.einsum("oc,bcn->bon", w.reshape(w.shape[0], w.shape[1]), x)
    return y if b is None else y + b[None, :, None]


def batch_norm(y: torch.Tensor, sd: dict, key: str, training: bool) -> tuple[torch.Tensor, dict]:
    """BatchNorm over the channels of ``(B, C, N)``; in training, also the updated running stats."""
    new = {}
    if training:
        n = y.shape[0] * y.shape[2]
        mean = y.mean(dim=(0, 2))
        var = ((y - mean[None, :, None]) ** 2).sum(dim=(0, 2)) / n
        new[f"{key}.running_mean"] = (1 - MOMENTUM) * sd[f"{key}.running_mean"] + MOMENTUM * mean
        new[f"{key}.running_var"] = (1 - MOMENTUM) * sd[f"{key}.running_var"] + MOMENTUM * var * n / (n - 1)
        new[f"{key}.num_batches_tracked"] = sd[f"{key}.num_batches_tracked"] + 1
    else:
        mean, var = sd[f"{key}.running_mean"], sd[f"{key}.running_var"]
    out = (y - mean[None, :, None]) / torch.sqrt(var[None, :, None] + EPS)
    return out * sd[f"{key}.weight"][None, :, None] + sd[f"{key}.bias"][None, :, None], new


def group_norm(y: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    b, c, n = y.shape
    yg = y.reshape(b, groups, -1)
    mean = yg.mean(-1, keepdim=True)
    var = ((yg - mean) ** 2).mean(-1, keepdim=True)
    out = ((yg - mean) / torch.sqrt(var + EPS)).reshape(b, c, n)
    return out * weight[None, :, None] + bias[None, :, None]


def official_units(sd: dict) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))


def official_stage(sd: dict, x: torch.Tensor, unit: str, is_norm: bool, is_sys: bool, training: bool):
    """The official ``Stage``: returns (output, updated BN stats, A)."""
    b, c = x.shape[:2]
    xs = x.reshape(b, c, -1)
    theta, phi = conv1x1(sd["t.weight"], xs), conv1x1(sd["p.weight"], xs)  # (B, C_s, N)
    if is_norm:
        m = F.relu(theta).transpose(1, 2) @ F.relu(phi)  # (B, N, N)
        if is_sys:
            m = (m + m.transpose(1, 2)) / 2
        d = m.sum(-1)
        dinv = torch.zeros_like(d)
        dinv[d != 0] = d[d != 0] ** -0.5
        a = dinv[:, :, None] * m * dinv[:, None, :]
    else:
        s = theta.transpose(1, 2) @ phi
        if is_sys:
            s = (s + s.transpose(1, 2)) / 2
        a = torch.softmax(s, dim=-1)
    h, stats = xs, {}
    for i in range(official_units(sd)):
        z = conv1x1(sd[f"stages.{i}.g.weight"], h)  # the unit's own input
        az = z @ a.transpose(1, 2)  # (A Z)_i = Σ_j A_ij Z_j, channels first
        w2 = sd[f"stages.{i}.w_2.weight"]
        if unit == "snl":
            out = conv1x1(sd[f"stages.{i}.w_1.weight"], z) + conv1x1(w2, az)
        elif unit == "ns":
            out = conv1x1(w2, z) - conv1x1(w2, az)
        else:
            out = conv1x1(w2, az)
        y, new = batch_norm(out, sd, f"stages.{i}.bn", training)
        stats.update(new)
        h = h + F.relu(y)
    return h.reshape(x.shape), stats, a


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def mmcv_pool(t: torch.Tensor) -> torch.Tensor:
    dim = t.dim() - 2
    if dim == 1:
        return F.max_pool1d(t, 2)
    if dim == 2:
        return F.max_pool2d(t, (2, 2))
    return F.max_pool3d(t, (1, 2, 2))


def mmcv_nonlocal(sd: dict, x: torch.Tensor, mode: str, sub_sample: bool, use_scale: bool, training: bool,
                  gn_groups: int | None = None):
    """mmcv's ``NonLocal{1,2,3}d.forward``: returns (output, updated BN stats)."""
    b, c = x.shape[:2]
    conv = CONV[x.dim() - 2]
    gk, pk = ("g.0.conv", "phi.0.conv") if sub_sample else ("g.conv", "phi.conv")
    cs = sd[f"{gk}.weight"].shape[0]
    g_x = conv(x, sd[f"{gk}.weight"], sd[f"{gk}.bias"])
    if sub_sample:
        g_x = mmcv_pool(g_x)
    g_x = g_x.reshape(b, cs, -1).permute(0, 2, 1)  # (B, N', C_s)
    if mode == "gaussian":
        theta_x = x.reshape(b, c, -1).permute(0, 2, 1)
        phi_x = (mmcv_pool(x) if sub_sample else x).reshape(b, c, -1)
    else:
        theta_x = conv(x, sd["theta.conv.weight"], sd["theta.conv.bias"]).reshape(b, cs, -1).permute(0, 2, 1)
        phi = conv(x, sd[f"{pk}.weight"], sd[f"{pk}.bias"])
        phi_x = (mmcv_pool(phi) if sub_sample else phi).reshape(b, cs, -1)  # (B, C_s, N')
    n, n_keys = theta_x.shape[1], phi_x.shape[-1]
    if mode in ("gaussian", "embedded_gaussian"):
        pw = theta_x @ phi_x
        if mode == "embedded_gaussian" and use_scale:
            pw = pw / cs**0.5
        pw = torch.softmax(pw, dim=-1)
    elif mode == "dot_product":
        pw = theta_x @ phi_x / n_keys
    else:  # concatenation: a Conv2d over [θ_i; φ_j] for every pair, then ReLU, then / N'
        th = theta_x.permute(0, 2, 1)[:, :, :, None].expand(b, cs, n, n_keys)
        ph = phi_x[:, :, None, :].expand(b, cs, n, n_keys)
        pw = F.relu(F.conv2d(torch.cat([th, ph], 1), sd["concat_project.conv.weight"]))[:, 0] / n_keys
    y = (pw @ g_x).permute(0, 2, 1).reshape(b, cs, *x.shape[2:])
    out = conv(y, sd["conv_out.conv.weight"], sd.get("conv_out.conv.bias")).reshape(b, c, -1)
    stats = {}
    if "conv_out.bn.weight" in sd:
        out, stats = batch_norm(out, sd, "conv_out.bn", training)
    elif "conv_out.gn.weight" in sd:
        out = group_norm(out, gn_groups, sd["conv_out.gn.weight"], sd["conv_out.gn.bias"])
    return x + out.reshape(x.shape), stats


def test_literal_batch_norm_matches_torch():
    """The references' BatchNorm is the one of torch.nn (outputs and running stats)."""
    g = gen(0)
    y = randn(3, 5, 7, g=g)
    sd = {"bn.weight": randn(5, g=g), "bn.bias": randn(5, g=g), "bn.running_mean": randn(5, g=g),
          "bn.running_var": torch.rand(5, generator=g, dtype=DT) + 0.5, "bn.num_batches_tracked": torch.tensor(2)}
    bn = torch.nn.BatchNorm1d(5).double()
    bn.load_state_dict({k[3:]: v for k, v in sd.items()})
    for training in (True, False):
        bn.train(training)
        out, new = batch_norm(y, sd, "bn", training)
        assert_close(bn(y), out)
        sd.update(new)
        assert_close(bn.running_var, sd["bn.running_var"])
        assert_close(bn.running_mean, sd["bn.running_mean"])


# --------------------------------------------------------------------------------------- official SNL
def official_sd(unit: str, n_units: int, *, c: int = 8, cs: int = 4, cv: int | None = None, dim: int = 2,
                seed: int = 0) -> dict:
    g, ones, cv = gen(seed), (1,) * dim, cv or cs
    sd = {"t.weight": randn(cs, c, *ones, g=g, std=0.5), "p.weight": randn(cs, c, *ones, g=g, std=0.5)}
    for i in range(n_units):
        s = f"stages.{i}"
        sd[f"{s}.g.weight"] = randn(cv, c, *ones, g=g, std=0.5)
        if unit == "snl":
            sd[f"{s}.w_1.weight"] = randn(c, cv, *ones, g=g, std=0.5)
        sd[f"{s}.w_2.weight"] = randn(c, cv, *ones, g=g, std=0.5)
        sd[f"{s}.bn.weight"] = 1 + randn(c, g=g, std=0.2)
        sd[f"{s}.bn.bias"] = randn(c, g=g, std=0.1)
        sd[f"{s}.bn.running_mean"] = randn(c, g=g, std=0.1)
        sd[f"{s}.bn.running_var"] = torch.rand(c, generator=g, dtype=DT) + 0.5
        sd[f"{s}.bn.num_batches_tracked"] = torch.tensor(7)
    return sd


ZERO_DEGREE = ((0, 0), (1, 3), (1, 4))  # (batch item, position) where relu(θ) = relu(φ) = 0


def official_input(sd: dict, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random input with a few positions where θ = φ = -1 (all-zero relu features: zero degree) but X ≠ 0."""
    x = randn(*shape, g=gen(100 + seed))
    flat = x.reshape(shape[0], shape[1], -1)
    wtp = torch.cat([sd["t.weight"].flatten(1), sd["p.weight"].flatten(1)])
    u = torch.linalg.pinv(wtp) @ torch.ones(wtp.shape[0], dtype=DT)  # wtp u = 1
    for b, pos in ZERO_DEGREE:
        flat[b, :, pos] = -u
    return flat.reshape(shape)


def check_official(block, sd: dict, xs: list[torch.Tensor], unit: str, normalized: bool, symmetric: bool,
                   training: bool) -> None:
    """Outputs and BatchNorm state after each forward, ``xs`` one after the other."""
    block.train(training)
    sd = dict(sd)
    for x in xs:
        ref, new, _ = official_stage(sd, x, unit, normalized, symmetric, training)
        assert_close(block(x), ref)
        sd.update(new)
        for i, u in enumerate(block.units):
            for name in ("running_mean", "running_var"):
                assert_close(getattr(u.norm.bn, name), sd[f"stages.{i}.bn.{name}"])
            assert int(u.norm.bn.num_batches_tracked) == int(sd[f"stages.{i}.bn.num_batches_tracked"])


@pytest.mark.parametrize("unit", OFFICIAL_UNITS)
@pytest.mark.parametrize("n_units", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_official_default_flags(unit, n_units, training):
    """is_norm=True, is_sys=True (the authors' models), zero-degree rows included."""
    sd = official_sd(unit, n_units, seed=n_units)
    block = from_official_snl(sd, unit=unit)
    assert isinstance(block, NonlocalBlock) and block.name == unit and len(block.units) == n_units
    assert block.dim == 2 and block.units[0].g.weight.dtype == DT
    xs = [official_input(sd, (2, 8, 5, 4), seed) for seed in (0, 1)]
    _, _, a = official_stage(sd, xs[0], unit, True, True, False)
    for b, pos in ZERO_DEGREE:  # the test really has isolated nodes
        assert a[b, pos].abs().sum() == 0 and a[b, :, pos].abs().sum() == 0
    assert a.abs().sum() > 0
    check_official(block, sd, xs, unit, True, True, training)
    assert_close(block.affinity(xs[0]), a)


@pytest.mark.parametrize("unit", OFFICIAL_UNITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_official_softmax_affinity(unit, symmetric, training):
    """is_norm=False: softmax of θφᵀ, or of its symmetrized form (stacked projections, scale 1/2)."""
    sd = official_sd(unit, 2, seed=5)
    block = from_official_snl(sd, unit=unit, normalized=False, symmetric=symmetric)
    xs = [randn(2, 8, 4, 5, g=gen(s)) for s in (0, 1)]
    check_official(block, sd, xs, unit, False, symmetric, training)
    assert_close(block.affinity(xs[0]), official_stage(sd, xs[0], unit, False, symmetric, False)[2])


def test_official_symmetric_softmax_with_padding():
    """C = 10, C_s = 3: the stacked [θ; φ] (6 channels) is padded with zero rows to C // reduction = 10."""
    sd = official_sd("snl", 2, c=10, cs=3, seed=3)
    block = from_official_snl(sd, normalized=False, symmetric=True)
    assert block.edges.theta.weight.shape[0] == 10
    check_official(block, sd, [randn(2, 10, 3, 4, g=gen(0))], "snl", False, True, True)


@pytest.mark.parametrize("dim,shape", [(1, (2, 8, 9)), (3, (2, 8, 3, 4, 3))])
@pytest.mark.parametrize("unit", ["snl", "ns"])
def test_official_other_dims_and_value_channels(dim, shape, unit):
    """dim from the weights' rank; g with C_v != C_s channels."""
    sd = official_sd(unit, 2, dim=dim, cv=3, seed=dim)
    block = from_official_snl(sd, unit=unit)
    assert block.dim == dim
    check_official(block, sd, [official_input(sd, shape, 0)], unit, True, True, True)


def test_official_prefix_and_input_gradient():
    sd = official_sd("snl", 2, seed=9)
    whole = {"backbone.conv.weight": torch.zeros(3), **{f"layer3.1.snl.{k}": v for k, v in sd.items()}}
    block = from_official_snl(whole, prefix="layer3.1.snl.")
    x = official_input(sd, (2, 8, 4, 4), 0).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (block(x) ** 2).sum().backward()
    (official_stage(sd, x2, "snl", True, True, True)[0] ** 2).sum().backward()
    assert_close(x.grad, x2.grad)


def test_official_without_num_batches_tracked():
    sd = {k: v for k, v in official_sd("nl", 1).items() if not k.endswith("num_batches_tracked")}
    block = from_official_snl(sd, unit="nl").eval()
    x = official_input(official_sd("nl", 1), (2, 8, 4, 4), 0)
    assert_close(block(x), official_stage(sd, x, "nl", True, True, False)[0])


# --------------------------------------------------------------------------------------- official errors
def test_official_not_expressible():
    sd = official_sd("snl", 1)
    with pytest.raises(NotImplementedError, match="normalized=True, symmetric=False"):
        from_official_snl(sd, normalized=True, symmetric=False)
    full = official_sd("snl", 1, c=8, cs=8)  # C_s = C: no room for the stacked [θ; φ]
    with pytest.raises(NotImplementedError, match=r"normalized=False, symmetric=True.*C >= 2 C_s"):
        from_official_snl(full, normalized=False, symmetric=True)
    from_official_snl(full)  # the default flags are fine with C_s = C


def test_official_key_errors():
    sd = official_sd("snl", 2)
    bad = dict(sd)
    del bad["stages.1.bn.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['stages.1.bn.running_var'\].*Expected keys"):
        from_official_snl(bad)
    bad = dict(sd, **{"stages.0.extra.weight": torch.zeros(1), "q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['q.weight', 'stages.0.extra.weight'\]"):
        from_official_snl(bad)
    gap = {k.replace("stages.1.", "stages.2."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"missing keys \['stages.1.g.weight'"):
        from_official_snl(gap)
    with pytest.raises(ValueError, match=r"unexpected keys \['stages.0.w_1.weight'.*pass unit='snl'"):
        from_official_snl(sd, unit="nl")
    with pytest.raises(ValueError, match=r"missing keys \['stages.0.w_1.weight'.*pass unit='ns' or unit='nl'"):
        from_official_snl(official_sd("ns", 1), unit="snl")
    with pytest.raises(ValueError, match="no units found"):
        from_official_snl({"t.weight": sd["t.weight"], "p.weight": sd["p.weight"]})
    with pytest.raises(ValueError, match="no keys under prefix 'nl.'"):
        from_official_snl(sd, prefix="nl.")
    with pytest.raises(ValueError, match="no keys"):
        from_official_snl({})


def test_official_shape_errors():
    sd = official_sd("snl", 2)
    bad = dict(sd, **{"stages.1.g.weight": torch.zeros(3, 8, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'stages.1.g.weight' has shape \(3, 8, 1, 1\), expected \(4, 8, 1, 1\)"):
        from_official_snl(bad)
    bad = dict(sd, **{"stages.0.bn.bias": torch.zeros(7, dtype=DT), "p.weight": torch.zeros(4, 8, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'p.weight' has shape \(4, 8, 1\), expected \(4, 8, 1, 1\).*"
                                         r"'stages.0.bn.bias' has shape \(7,\), expected \(8,\)"):
        from_official_snl(bad)
    bad = dict(sd, **{"t.weight": torch.zeros(4, 8, 3, 3, dtype=DT)})
    with pytest.raises(ValueError, match="'t.weight' has shape .* expected a 1x1 convolution"):
        from_official_snl(bad)
    odd = official_sd("snl", 1, c=8, cs=3)  # 8 // 2 = 4, 8 // 3 = 2: no reduction gives 3
    with pytest.raises(ValueError, match="not C // reduction"):
        from_official_snl(odd)


def test_official_argument_errors():
    sd = official_sd("snl", 1)
    with pytest.raises(ValueError, match="unit: expected one of"):
        from_official_snl(sd, unit="gsnl")
    with pytest.raises(TypeError, match="normalized: expected a bool"):
        from_official_snl(sd, normalized=1)
    with pytest.raises(TypeError, match="expected a mapping"):
        from_official_snl([("t.weight", sd["t.weight"])])
    with pytest.raises(ValueError, match="expected tensors"):
        from_official_snl(dict(sd, **{"stages.0.bn.num_batches_tracked": 3}))


# --------------------------------------------------------------------------------------- mmcv
def mmcv_sd(mode: str, dim: int, sub_sample: bool, norm: str, *, c: int = 6, reduction: int = 2,
            seed: int = 0) -> dict:
    g, ones = gen(seed), (1,) * dim
    cs = max(c // reduction, 1)
    gk, pk = ("g.0.conv", "phi.0.conv") if sub_sample else ("g.conv", "phi.conv")
    sd = {f"{gk}.weight": randn(cs, c, *ones, g=g, std=0.5), f"{gk}.bias": randn(cs, g=g, std=0.2)}
    if mode != "gaussian":
        for k in ("theta.conv", pk):
            sd[f"{k}.weight"] = randn(cs, c, *ones, g=g, std=0.5)
            sd[f"{k}.bias"] = randn(cs, g=g, std=0.2)
    sd["conv_out.conv.weight"] = randn(c, cs, *ones, g=g, std=0.5)
    if norm == "none":
        sd["conv_out.conv.bias"] = randn(c, g=g, std=0.2)
    elif norm == "bn":
        sd.update({"conv_out.bn.weight": 1 + randn(c, g=g, std=0.2), "conv_out.bn.bias": randn(c, g=g, std=0.1),
                   "conv_out.bn.running_mean": randn(c, g=g, std=0.1),
                   "conv_out.bn.running_var": torch.rand(c, generator=g, dtype=DT) + 0.5,
                   "conv_out.bn.num_batches_tracked": torch.tensor(11)})
    else:
        sd.update({"conv_out.gn.weight": 1 + randn(c, g=g, std=0.2), "conv_out.gn.bias": randn(c, g=g, std=0.1)})
    if mode == "concatenation":
        sd["concat_project.conv.weight"] = randn(1, 2 * cs, 1, 1, g=g, std=0.5)  # a Conv2d for every dim
    return sd


MMCV_SHAPES = {1: (2, 6, 7), 2: (2, 6, 5, 4), 3: (2, 6, 3, 4, 5)}


def check_mmcv(block, sd: dict, xs: list[torch.Tensor], mode: str, sub_sample: bool, use_scale: bool,
               training: bool, gn_groups: int | None = None) -> None:
    block.train(training)
    sd = dict(sd)
    for x in xs:
        ref, new = mmcv_nonlocal(sd, x, mode, sub_sample, use_scale, training, gn_groups)
        assert_close(block(x), ref)
        sd.update(new)
        if "conv_out.bn.weight" in sd:
            bn = block.units[0].norm.bn
            assert_close(bn.running_mean, sd["conv_out.bn.running_mean"])
            assert_close(bn.running_var, sd["conv_out.bn.running_var"])
            assert int(bn.num_batches_tracked) == int(sd["conv_out.bn.num_batches_tracked"])


MMCV_CASES = [(m, d, s, n) for m in MMCV_MODES for d in (1, 2, 3) for s in (False, True) for n in ("none", "bn")]


@pytest.mark.parametrize("mode,dim,sub_sample,norm", MMCV_CASES)
def test_mmcv(mode, dim, sub_sample, norm):
    sd = mmcv_sd(mode, dim, sub_sample, norm, seed=dim)
    block = from_mmcv(sd, mode=mode, dim=dim, sub_sample=sub_sample)
    assert isinstance(block, NonlocalBlock) and block.name == "nl" and block.dim == dim
    xs = [randn(*MMCV_SHAPES[dim], g=gen(s)) * 0.7 for s in (0, 1)]
    for training in (False, True):
        check_mmcv(block, sd, xs, mode, sub_sample, True, training)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_mmcv_use_scale_false(mode):
    """use_scale only scales embedded_gaussian (mmcv's gaussian mode is never scaled)."""
    sd = mmcv_sd(mode, 2, False, "bn", seed=4)
    x = randn(2, 6, 4, 4, g=gen(0))
    block = from_mmcv(sd, mode=mode, use_scale=False)
    check_mmcv(block, sd, [x], mode, False, False, False)
    if mode == "embedded_gaussian":  # and the two settings really differ
        other = from_mmcv(sd, mode=mode).eval()
        assert (other(x) - block(x)).abs().max() > 1e-3


@pytest.mark.parametrize("mode,groups", [("embedded_gaussian", 2), ("concatenation", 3), ("dot_product", 6)])
@pytest.mark.parametrize("training", [False, True])
def test_mmcv_groupnorm(mode, groups, training):
    sd = mmcv_sd(mode, 2, True, "gn", seed=6)
    block = from_mmcv(sd, mode=mode, sub_sample=True, gn_groups=groups)
    check_mmcv(block, sd, [randn(2, 6, 5, 4, g=gen(0))], mode, True, True, training, groups)


@pytest.mark.parametrize("c,reduction", [(1, 2), (3, 2), (5, 2), (8, 4), (7, 3)])
def test_mmcv_channel_counts(c, reduction):
    """C_s = max(C // reduction, 1) for odd C, C = 1 and other reductions."""
    sd = mmcv_sd("embedded_gaussian", 2, False, "bn", c=c, reduction=reduction, seed=c)
    block = from_mmcv(sd, mode="embedded_gaussian")
    check_mmcv(block, sd, [randn(2, c, 4, 3, g=gen(0))], "embedded_gaussian", False, True, True)


def test_mmcv_conv_bias_before_norm_and_gradient():
    """A conv_out bias next to a norm is accepted (and used); input gradients agree."""
    sd = mmcv_sd("concatenation", 2, True, "bn", seed=8)
    sd["conv_out.conv.bias"] = randn(6, g=gen(1))
    block = from_mmcv({f"neck.nl.{k}": v for k, v in sd.items()}, mode="concatenation", sub_sample=True,
                      prefix="neck.nl.")
    x = randn(2, 6, 4, 5, g=gen(0)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (block(x) ** 2).sum().backward()
    (mmcv_nonlocal(sd, x2, "concatenation", True, True, True)[0] ** 2).sum().backward()
    assert_close(x.grad, x2.grad)


def test_mmcv_concat_weight_of_dim_rank():
    """concat_project stored with the block's rank (1, 2C_s, 1) is accepted as well as mmcv's Conv2d."""
    sd = mmcv_sd("concatenation", 1, False, "none", seed=2)
    x = randn(2, 6, 7, g=gen(0))
    ref = mmcv_nonlocal(sd, x, "concatenation", False, True, False)[0]
    sd["concat_project.conv.weight"] = sd["concat_project.conv.weight"].reshape(1, 6, 1)
    assert_close(from_mmcv(sd, mode="concatenation", dim=1)(x), ref)


# --------------------------------------------------------------------------------------- mmcv errors
def test_mmcv_errors():
    sd = mmcv_sd("embedded_gaussian", 2, False, "bn")
    with pytest.raises(ValueError, match="mode: expected one of"):
        from_mmcv(sd, mode="relu_dot")
    with pytest.raises(ValueError, match="dim: expected 1, 2 or 3"):
        from_mmcv(sd, mode="embedded_gaussian", dim=4)
    with pytest.raises(ValueError, match=r"NonLocal2d\); pass dim=2"):
        from_mmcv(sd, mode="embedded_gaussian", dim=3)
    with pytest.raises(ValueError, match=r"missing keys \['g.0.conv.weight'.*pass sub_sample=False"):
        from_mmcv(sd, mode="embedded_gaussian", sub_sample=True)
    sub = mmcv_sd("dot_product", 2, True, "none")
    with pytest.raises(ValueError, match=r"unexpected keys \['g.0.conv.bias'.*pass sub_sample=True"):
        from_mmcv(sub, mode="dot_product")
    with pytest.raises(ValueError, match=r"unexpected keys \['phi.conv.bias'.*'theta.conv.weight'\].*gaussian"):
        from_mmcv(sd, mode="gaussian")
    with pytest.raises(ValueError, match=r"missing keys \['theta.conv.weight'.*mode='gaussian'"):
        from_mmcv(mmcv_sd("gaussian", 2, False, "bn"), mode="dot_product")
    with pytest.raises(ValueError, match=r"missing keys \['concat_project.conv.weight'\]"):
        from_mmcv(sd, mode="concatenation")
    with pytest.raises(ValueError, match=r"unexpected keys \['concat_project.conv.weight'\].*'concatenation'"):
        from_mmcv(mmcv_sd("concatenation", 2, False, "bn"), mode="dot_product")
    bad = dict(sd)
    del bad["conv_out.bn.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys \['conv_out.bn.running_mean'\].*Expected keys"):
        from_mmcv(bad, mode="embedded_gaussian")
    nonorm = mmcv_sd("embedded_gaussian", 2, False, "none")
    del nonorm["conv_out.conv.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['conv_out.conv.bias'\]"):
        from_mmcv(nonorm, mode="embedded_gaussian")


def test_mmcv_shape_and_norm_errors():
    sd = mmcv_sd("concatenation", 2, False, "bn")
    bad = dict(sd, **{"concat_project.conv.weight": torch.zeros(1, 4, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'concat_project.conv.weight' has shape \(1, 4, 1, 1\), "
                                         r"expected \(1, 6, 1, 1\)"):
        from_mmcv(bad, mode="concatenation")
    bad = dict(sd, **{"theta.conv.bias": torch.zeros(2, dtype=DT), "conv_out.conv.weight": torch.zeros(6, 2, 1, 1)})
    with pytest.raises(ValueError, match=r"'conv_out.conv.weight' has shape \(6, 2, 1, 1\), expected \(6, 3, 1, 1\); "
                                         r"'theta.conv.bias' has shape \(2,\), expected \(3,\)"):
        from_mmcv(bad, mode="concatenation")
    both = dict(sd, **{"conv_out.gn.weight": torch.ones(6, dtype=DT), "conv_out.gn.bias": torch.zeros(6, dtype=DT)})
    with pytest.raises(ValueError, match=r"both BatchNorm keys .* and GroupNorm keys \['conv_out.gn.weight'"):
        from_mmcv(both, mode="concatenation")
    gn = mmcv_sd("gaussian", 2, False, "gn")
    with pytest.raises(ValueError, match="pass gn_groups="):
        from_mmcv(gn, mode="gaussian")
    with pytest.raises(ValueError, match="gn_groups=4 does not divide C = 6"):
        from_mmcv(gn, mode="gaussian", gn_groups=4)
