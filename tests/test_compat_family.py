"""from_mmcv (CrissCrossAttention, ContextBlock), from_cgnl and from_timm against literal re-implementations.

Each reference below is written from the public module's parameter layout and forward, on the raw state-dict
tensors with torch.nn.functional only (no nonlocalnet code): mmcv's ``CrissCrossAttention`` (CCNet, Huang et al.,
ICCV 2019) and ``ContextBlock`` (GCNet, Cao et al., ICCVW 2019), the CGNL authors' ``SpatialCGNL`` /
``SpatialCGNLx`` (Yue et al., NeurIPS 2018) and timm's ``NonLocalAttn``. float64, rtol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _util import assert_close

from nonlocalnet.compat import from_cgnl, from_mmcv, from_timm

DT = torch.float64


def randn(*shape, g, std=0.4):
    return torch.randn(*shape, generator=g, dtype=DT) * std


def conv(w, x, b=None):
    return F.conv2d(x, w, b)


# --------------------------------------------------------------------------------------- mmcv CC
def cc_state(c=16, cs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, o in (("query_conv", cs), ("key_conv", cs), ("value_conv", c)):
        sd[f"{m}.weight"], sd[f"{m}.bias"] = randn(o, c, 1, 1, g=g), randn(o, g=g)
    sd["gamma.scale"] = torch.tensor(0.7, dtype=DT)
    return sd


def mmcv_cca(sd, x):
    """mmcv CrissCrossAttention.forward: energies over the column (self masked by -inf) and the row, one softmax."""
    b, c, h, w = x.shape
    q, k = conv(sd["query_conv.weight"], x, sd["query_conv.bias"]), conv(sd["key_conv.weight"], x, sd["key_conv.bias"])
    v = conv(sd["value_conv.weight"], x, sd["value_conv.bias"])
    neg_diag = torch.diag(torch.full((h,), float("-inf"), dtype=DT))
    energy_h = (torch.einsum("bchw,bciw->bwhi", q, k) + neg_diag).transpose(1, 2)  # (B, H, W, H)
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)  # (B, H, W, W)
    attn = torch.softmax(torch.cat([energy_h, energy_w], -1), -1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :h]) + torch.einsum("bchj,bhwj->bchw", v, attn[..., h:])
    return sd["gamma.scale"] * out + x


@pytest.mark.parametrize("recurrence", [1, 2])
def test_mmcv_criss_cross(recurrence):
    sd = cc_state()
    block = from_mmcv({"decode_head.cca." + k: v for k, v in sd.items()}, module="CrissCrossAttention",
                      prefix="decode_head.cca.", recurrence=recurrence)
    x = randn(2, 16, 5, 4, g=torch.Generator().manual_seed(1), std=1.0)
    expect = x
    for _ in range(recurrence):  # mmseg's CCHead: the same module applied `recurrence` times
        expect = mmcv_cca(sd, expect)
    assert_close(block(x), expect)
    assert block.edges.theta.weight.shape == (2, 16, 1, 1)


def test_mmcv_criss_cross_errors():
    sd = cc_state()
    bad = dict(sd)
    del bad["gamma.scale"]
    bad["gamma"] = torch.zeros(1, dtype=DT)
    with pytest.raises(ValueError, match=r"missing keys \['gamma.scale'\].*unexpected keys \['gamma'\].*rename"):
        from_mmcv(bad, module="CrissCrossAttention")
    bad = dict(sd, **{"key_conv.weight": torch.zeros(3, 16, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'key_conv.weight' has shape \(3, 16, 1, 1\), expected \(2, 16, 1, 1\)"):
        from_mmcv(bad, module="CrissCrossAttention")
    with pytest.raises(ValueError, match="mode: applies to module='NonLocal'"):
        from_mmcv(sd, module="CrissCrossAttention", mode="embedded_gaussian")
    with pytest.raises(ValueError, match="module: expected one of"):
        from_mmcv(sd, module="CCAttention")


# --------------------------------------------------------------------------------------- mmcv ContextBlock
def gc_state(c=16, planes=4, fusions=("channel_add",), seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"conv_mask.weight": randn(1, c, 1, 1, g=g), "conv_mask.bias": randn(1, g=g)}
    for f in fusions:
        sd.update({f"{f}_conv.0.weight": randn(planes, c, 1, 1, g=g), f"{f}_conv.0.bias": randn(planes, g=g),
                   f"{f}_conv.1.weight": 1 + randn(planes, 1, 1, g=g), f"{f}_conv.1.bias": randn(planes, 1, 1, g=g),
                   f"{f}_conv.3.weight": randn(c, planes, 1, 1, g=g), f"{f}_conv.3.bias": randn(c, g=g)})
    return sd


def mmcv_context_block(sd, x):
    """mmcv ContextBlock.forward: pooling_type='att' (conv_mask, softmax over positions) or, without conv_mask
    keys, pooling_type='avg' (AdaptiveAvgPool2d(1))."""
    b, c, h, w = x.shape
    if "conv_mask.weight" in sd:
        mask = torch.softmax(conv(sd["conv_mask.weight"], x, sd["conv_mask.bias"]).reshape(b, 1, h * w), dim=2)
        context = (x.reshape(b, 1, c, h * w) @ mask.unsqueeze(-1)).reshape(b, c, 1, 1)
    else:
        context = F.adaptive_avg_pool2d(x, 1)

    def transform(f):
        t = conv(sd[f"{f}_conv.0.weight"], context, sd[f"{f}_conv.0.bias"])
        planes = t.shape[1]
        t = F.layer_norm(t, [planes, 1, 1], sd[f"{f}_conv.1.weight"], sd[f"{f}_conv.1.bias"], eps=1e-5)
        return conv(sd[f"{f}_conv.3.weight"], F.relu(t), sd[f"{f}_conv.3.bias"])

    out = x
    if "channel_mul_conv.0.weight" in sd:
        out = out * torch.sigmoid(transform("channel_mul"))
    if "channel_add_conv.0.weight" in sd:
        out = out + transform("channel_add")
    return out


@pytest.mark.parametrize("fusions", [("channel_add",), ("channel_mul",), ("channel_add", "channel_mul")])
def test_mmcv_context_block(fusions):
    sd = gc_state(fusions=fusions)
    block = from_mmcv(sd, module="ContextBlock")
    x = randn(2, 16, 6, 5, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), mmcv_context_block(sd, x))
    assert block.units[0].fusion == {("channel_add",): "add", ("channel_mul",): "mul"}.get(fusions, "add_mul")
    assert type(block.build_graph(x)).__name__ == "UnaryGraph"


def test_mmcv_context_block_errors():
    sd = gc_state()
    with pytest.raises(ValueError, match=r"missing keys \['conv_mask.bias'\]"):  # half a mask: neither att nor avg
        from_mmcv({k: v for k, v in sd.items() if k != "conv_mask.bias"}, module="ContextBlock")
    avg = {k: v for k, v in sd.items() if not k.startswith("conv_mask")}
    bad = dict(avg, **{"channel_add_conv.3.weight": torch.zeros(16, 5, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"C = 16, planes = 4, dim = 2\): 'channel_add_conv.3.weight' has shape"):
        from_mmcv(bad, module="ContextBlock")
    bad = dict(sd)
    del bad["channel_add_conv.1.bias"]
    bad["channel_add_conv.2.bias"] = torch.zeros(4, dtype=DT)
    with pytest.raises(ValueError, match=r"missing keys \['channel_add_conv.1.bias'\].*unexpected keys "
                                         r"\['channel_add_conv.2.bias'\]"):
        from_mmcv(bad, module="ContextBlock")
    bad = dict(sd, **{"channel_add_conv.3.weight": torch.zeros(16, 5, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"planes = 4\): 'channel_add_conv.3.weight' has shape \(16, 5, 1, 1\), "
                                         r"expected \(16, 4, 1, 1\)"):
        from_mmcv(bad, module="ContextBlock")
    with pytest.raises(ValueError, match="no fusion branch"):
        from_mmcv({k: v for k, v in sd.items() if k.startswith("conv_mask")}, module="ContextBlock")


# --------------------------------------------------------------------------------------- CGNL authors
def cgnl_state(c=16, cs=8, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: randn(cs, c, 1, 1, g=g) for k in ("t.weight", "p.weight", "g.weight")}
    sd["z.weight"] = randn(c, cs // groups, 1, 1, g=g)
    sd["gn.weight"], sd["gn.bias"] = 1 + randn(c, g=g), randn(c, g=g)
    return sd


def spatial_cgnl(sd, x, groups, use_scale, order=None, gamma=1e-4):
    """SpatialCGNL (order=None) / SpatialCGNLx (Taylor order, constant β = exp(-2γ)) forward."""
    t, p, g = (conv(sd[f"{k}.weight"], x) for k in ("t", "p", "g"))
    b, c, h, w = t.shape
    cg = c // groups
    outs = []
    for i in range(groups):
        ti, pi, gi = (u[:, i * cg:(i + 1) * cg].reshape(b, 1, -1) for u in (t, p, g))
        gi = gi.reshape(b, -1, 1)
        if order is None:
            att = pi @ gi
            if use_scale:
                att = att / math.sqrt(cg * h * w)
            y = att @ ti
        else:
            beta = math.exp(-2 * gamma)
            alphas = [math.sqrt((2 * gamma) ** k / math.factorial(k) * beta) for k in range(order + 1)]
            tt = torch.cat([ti.pow(k) * a for k, a in enumerate(alphas)], 1)  # (B, P+1, N·C_g)
            pt = torch.cat([pi.pow(k) * a for k, a in enumerate(alphas)], 1)
            att = pt @ gi  # (B, P+1, 1)
            if use_scale:
                att = att / math.sqrt(cg * h * w)
            y = att.reshape(b, 1, order + 1) @ tt
        outs.append(y.reshape(b, cg, h, w))
    z = F.conv2d(torch.cat(outs, 1), sd["z.weight"], groups=groups)
    return F.group_norm(z, groups, sd["gn.weight"], sd["gn.bias"], eps=1e-5) + x


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("use_scale", [False, True])
def test_from_cgnl_dot(groups, use_scale):
    sd = cgnl_state(groups=groups)
    block = from_cgnl(sd, use_scale=use_scale)
    x = randn(2, 16, 4, 3, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), spatial_cgnl(sd, x, groups, use_scale))


@pytest.mark.parametrize("order", [2, 3])
def test_from_cgnl_gaussian_constant_prefactor(order):
    sd = cgnl_state(groups=2)
    gamma = 0.05  # larger than the authors' 1e-4 so that the higher Taylor terms are visible at rtol 1e-6
    block = from_cgnl(sd, kernel="gaussian", order=order, gamma=gamma, use_scale=True)
    x = randn(2, 16, 4, 3, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), spatial_cgnl(sd, x, 2, True, order=order, gamma=gamma))
    assert block.edges.rbf_prefactor == "constant"


def test_from_cgnl_errors():
    sd = cgnl_state()
    with pytest.raises(ValueError, match=r"missing keys \['gn.bias'\]"):
        from_cgnl({k: v for k, v in sd.items() if k != "gn.bias"})
    with pytest.raises(ValueError, match=r"'g.weight' has shape \(4, 16, 1, 1\), expected \(8, 16, 1, 1\)"):
        from_cgnl(dict(sd, **{"g.weight": torch.zeros(4, 16, 1, 1, dtype=DT)}))
    with pytest.raises(ValueError, match="z.weight"):
        from_cgnl(dict(sd, **{"z.weight": torch.zeros(16, 3, 1, 1, dtype=DT)}))
    with pytest.raises(ValueError, match="kernel: expected 'dot_product'"):
        from_cgnl(sd, kernel="rbf")


# --------------------------------------------------------------------------------------- timm
def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def timm_state(c=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    cr = make_divisible(c / 8)
    sd = {}
    for m, (o, i) in (("t", (cr, c)), ("p", (cr, c)), ("g", (cr, c)), ("z", (c, cr))):
        sd[f"{m}.weight"], sd[f"{m}.bias"] = randn(o, i, 1, 1, g=g), randn(o, g=g)
    sd.update({"norm.weight": 1 + randn(c, g=g), "norm.bias": randn(c, g=g), "norm.running_mean": randn(c, g=g),
               "norm.running_var": 1 + randn(c, g=g).abs(), "norm.num_batches_tracked": torch.tensor(3)})
    return sd


def timm_nonlocal(sd, x, use_scale=True):
    b, c, h, w = x.shape
    t, p, g = (conv(sd[f"{k}.weight"], x, sd[f"{k}.bias"]).reshape(b, -1, h * w) for k in ("t", "p", "g"))
    att = torch.softmax(t.transpose(1, 2) @ p * (c ** -0.5 if use_scale else 1.0), dim=2)
    y = (att @ g.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    z = conv(sd["z.weight"], y, sd["z.bias"])
    return F.batch_norm(z, sd["norm.running_mean"], sd["norm.running_var"], sd["norm.weight"], sd["norm.bias"],
                        False, 0.1, 1e-5) + x


@pytest.mark.parametrize("use_scale", [True, False])
def test_from_timm(use_scale):
    sd = timm_state()
    assert sd["t.weight"].shape[0] == 16  # C = 72 -> 16: not C // reduction for any reduction
    block = from_timm(sd, use_scale=use_scale).eval()
    x = randn(2, 72, 4, 5, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), timm_nonlocal(sd, x, use_scale))
    assert block.edges.scale_value == (72 ** -0.5 if use_scale else 1.0)


def test_from_timm_errors():
    sd = timm_state()
    with pytest.raises(ValueError, match=r"missing keys \['z.bias'\].*unexpected keys \['zz.bias'\]"):
        from_timm({("zz.bias" if k == "z.bias" else k): v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"'z.weight' has shape \(72, 8, 1, 1\), expected \(72, 16, 1, 1\)"):
        from_timm(dict(sd, **{"z.weight": torch.zeros(72, 8, 1, 1, dtype=DT)}))


def _no_mask(sd):
    return {k: v for k, v in sd.items() if not k.startswith("conv_mask")}


@pytest.mark.parametrize("fusions", [("channel_add",), ("channel_mul",), ("channel_add", "channel_mul")])
def test_mmcv_context_block_avg_pooling(fusions):
    """pooling_type='avg' (no conv_mask): GC with zero logits, a softmax of equal logits being the mean, exactly."""
    sd = _no_mask(gc_state(fusions=fusions, seed=3))
    block = from_mmcv({"neck.gc." + k: v for k, v in sd.items()}, module="ContextBlock", prefix="neck.gc.")
    x = randn(2, 16, 6, 5, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), mmcv_context_block(sd, x))
    mask = block.edges.mask
    assert torch.equal(mask.weight, torch.zeros(1, 16, 1, 1, dtype=DT))
    assert torch.equal(mask.bias, torch.zeros(1, dtype=DT))
    assert not mask.weight.requires_grad and not mask.bias.requires_grad
    assert all(p.requires_grad for n, p in block.named_parameters() if not n.startswith("edges.mask."))
    # the graph is the mean: every row of A is 1/N
    assert_close(block.affinity(x), torch.full((2, 30, 30), 1 / 30, dtype=DT))
    # gradients equal the literal module's (input and every transform parameter); an SGD step keeps the mean
    xg = x.clone().requires_grad_(True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    ref = mmcv_context_block(leaves, xg)
    w = randn(*ref.shape, g=torch.Generator().manual_seed(2), std=1.0)
    (ref * w).sum().backward()
    xo = x.clone().requires_grad_(True)
    (block(xo) * w).sum().backward()
    assert_close(xo.grad, xg.grad)
    for f in fusions:
        dst = f"units.0.{ {'channel_add': 'w', 'channel_mul': 'w_mul'}[f]}.0"
        assert_close(block.get_parameter(f"{dst}.conv1.weight").grad, leaves[f"{f}_conv.0.weight"].grad)
        assert_close(block.get_parameter(f"{dst}.norm.weight").grad, leaves[f"{f}_conv.1.weight"].grad.reshape(4))
        assert_close(block.get_parameter(f"{dst}.conv2.bias").grad, leaves[f"{f}_conv.3.bias"].grad)
    assert mask.weight.grad is None
    opt = torch.optim.SGD(block.parameters(), lr=0.1, weight_decay=1e-2)
    opt.step()
    assert torch.equal(mask.weight, torch.zeros_like(mask.weight))
    assert_close(block.affinity(x), torch.full((2, 30, 30), 1 / 30, dtype=DT))


def test_mmcv_context_block_avg_gradcheck():
    sd = _no_mask(gc_state(c=4, planes=2, fusions=("channel_add", "channel_mul"), seed=5))
    block = from_mmcv(sd, module="ContextBlock")
    x = randn(1, 4, 3, 3, g=torch.Generator().manual_seed(1), std=1.0).requires_grad_(True)
    assert torch.autograd.gradcheck(block, (x,), fast_mode=True)
