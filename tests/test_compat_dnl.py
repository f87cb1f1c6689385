"""from_mmseg_dnl and from_official_dnl against literal re-implementations, written from each module's parameter
layout and forward on the raw state-dict tensors with torch.nn.functional only (Yin et al., "Disentangled Non-Local
Neural Networks", ECCV 2020). mmsegmentation's ``DisentangledNonLocal2d`` (DNLHead's block): mmcv's NonLocal2d
projections, queries and keys minus their means over the positions, the tempered pairwise softmax, the unary term
of ``conv_mask``, and ``conv_out`` applied to each term separately. The DNL authors' ``NonLocal2d_bn``
(whiten_type ['channel'], with_gc, with or without use_out and out_bn), whose pairwise term is scaled by a learnable
``gamma``. float64, rtol 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _util import assert_close

from nonlocalnet.compat import from_mmseg_dnl, from_official_dnl

DT = torch.float64


def randn(*shape, g, std=0.4):
    return torch.randn(*shape, generator=g, dtype=DT) * std


def dnl_state(c=16, cs=8, bn=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in ("g", "theta", "phi"):
        sd[f"{m}.conv.weight"], sd[f"{m}.conv.bias"] = randn(cs, c, 1, 1, g=g), randn(cs, g=g)
    sd["conv_mask.weight"], sd["conv_mask.bias"] = randn(1, c, 1, 1, g=g), randn(1, g=g)
    sd["conv_out.conv.weight"] = randn(c, cs, 1, 1, g=g)
    if bn:  # mmcv's ConvModule: no conv bias before a norm
        sd.update({"conv_out.bn.weight": 1 + randn(c, g=g), "conv_out.bn.bias": randn(c, g=g),
                   "conv_out.bn.running_mean": randn(c, g=g), "conv_out.bn.running_var": 0.5 + randn(c, g=g).abs(),
                   "conv_out.bn.num_batches_tracked": torch.tensor(7)})
    else:
        sd["conv_out.conv.bias"] = randn(c, g=g)
    return sd


def mmseg_dnl(sd, x, mode="embedded_gaussian", use_scale=True, temperature=0.05, train=False):
    """DisentangledNonLocal2d.forward on the state dict (BatchNorm in eval mode unless ``train``)."""
    b, c, h, w = x.shape

    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def conv_out(t):
        t = conv("conv_out.conv", t)
        if "conv_out.bn.weight" in sd:
            t = F.batch_norm(t, sd["conv_out.bn.running_mean"].clone(), sd["conv_out.bn.running_var"].clone(),
                             sd["conv_out.bn.weight"], sd["conv_out.bn.bias"], training=train, eps=1e-5)
        return t

    g_x = conv("g.conv", x).reshape(b, -1, h * w).transpose(1, 2)  # (B, N, C_s)
    theta = conv("theta.conv", x).reshape(b, -1, h * w).transpose(1, 2)  # (B, N, C_s)
    phi = conv("phi.conv", x).reshape(b, -1, h * w)  # (B, C_s, N)
    theta = theta - theta.mean(1, keepdim=True)
    phi = phi - phi.mean(2, keepdim=True)
    pair = theta @ phi
    if mode == "embedded_gaussian":
        if use_scale:
            pair = pair / theta.shape[-1] ** 0.5
        pair = torch.softmax(pair / temperature, -1)
    else:  # mmcv NonLocal's dot_product: divided by the number of keys
        pair = pair / pair.shape[-1]
    y = (pair @ g_x).transpose(1, 2).reshape(b, -1, h, w)
    mask = torch.softmax(conv("conv_mask", x).reshape(b, 1, h * w), -1)
    u = (mask @ g_x).transpose(1, 2).reshape(b, -1, 1, 1)
    return x + conv_out(y + u)  # mmseg 0.30 and 1.2.2: one conv_out on the sum


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product"])
def test_mmseg_dnl_without_norm_in_train_and_eval(mode):
    sd = dnl_state()
    block = from_mmseg_dnl({"decode_head.dnl_block." + k: v for k, v in sd.items()}, mode=mode,
                           prefix="decode_head.dnl_block.")
    x = randn(2, 16, 6, 5, g=torch.Generator().manual_seed(1), std=1.0)
    for train in (True, False):
        block.train(train)
        assert_close(block(x), mmseg_dnl(sd, x, mode))
    assert block.edges.gamma is None and block.units[0].norm.kind == "none"
    assert_close(block.units[0].w[0].bias, sd["conv_out.conv.bias"])  # one conv_out on the sum of both terms
    # the gradient with respect to the input equals the literal module's
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    wt = randn(2, 16, 6, 5, g=torch.Generator().manual_seed(2), std=1.0)
    (block(xa) * wt).sum().backward()
    (mmseg_dnl(sd, xb, mode) * wt).sum().backward()
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("use_scale, temperature", [(True, 0.05), (False, 0.3)])
def test_mmseg_dnl_scale_and_temperature(use_scale, temperature):
    sd = dnl_state(c=12, cs=6, seed=4)
    block = from_mmseg_dnl(sd, use_scale=use_scale, temperature=temperature)
    x = randn(2, 12, 4, 4, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), mmseg_dnl(sd, x, use_scale=use_scale, temperature=temperature))


@pytest.mark.parametrize("train", [False, True])
def test_mmseg_dnl_batchnorm_in_train_and_eval(train):
    sd = dnl_state(bn=True, seed=2)
    block = from_mmseg_dnl(sd).train(train)
    assert block.units[0].norm.kind == "bn"
    x = randn(2, 16, 5, 5, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), mmseg_dnl(sd, x, train=train))


def test_mmseg_dnl_groupnorm_needs_its_groups():
    sd = {k: v for k, v in dnl_state(seed=3).items() if k != "conv_out.conv.bias"}
    g = torch.Generator().manual_seed(4)
    sd.update({"conv_out.gn.weight": 1 + randn(16, g=g), "conv_out.gn.bias": randn(16, g=g)})
    with pytest.raises(ValueError, match="GroupNorm after conv_out.*pass gn_groups="):
        from_mmseg_dnl(sd)
    block = from_mmseg_dnl(sd, gn_groups=4)
    x = randn(2, 16, 5, 5, g=torch.Generator().manual_seed(1), std=1.0)
    b, c, h, w = x.shape
    ref_sd = dict(sd)
    ref = mmseg_dnl({k: v for k, v in ref_sd.items() if not k.startswith("conv_out.gn")}, x)
    # the reference's conv_out without its norm, then the GroupNorm on that output (the residual taken off first)
    expected = x + F.group_norm(ref - x, 4, sd["conv_out.gn.weight"], sd["conv_out.gn.bias"], eps=1e-5)
    assert_close(block(x), expected)


def test_mmseg_dnl_errors():
    sd = dnl_state()
    with pytest.raises(ValueError, match="mode: expected one of 'embedded_gaussian', 'dot_product'"):
        from_mmseg_dnl(sd, mode="gaussian")
    with pytest.raises(ValueError, match="temperature: expected a positive finite number"):
        from_mmseg_dnl(sd, temperature=0)
    with pytest.raises(ValueError, match=r"missing keys \['conv_mask.weight', 'conv_mask.bias'\]"):
        from_mmseg_dnl({k: v for k, v in sd.items() if not k.startswith("conv_mask")})
    bad = dict(sd, **{"conv_mask.weight": torch.zeros(2, 16, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'conv_mask.weight' has shape \(2, 16, 1, 1\), expected \(1, 16, 1, 1\)"):
        from_mmseg_dnl(bad)
    bad = dict(sd, **{"conv_out.bn.weight": torch.ones(16, dtype=DT), "conv_out.gn.weight": torch.ones(16, dtype=DT)})
    with pytest.raises(ValueError, match="both BatchNorm .* and GroupNorm"):
        from_mmseg_dnl(bad)
    bad = dict(sd, gamma=torch.zeros(1, dtype=DT))
    with pytest.raises(ValueError, match="unexpected keys \\['gamma'\\].*pairwise_gamma=True"):
        from_mmseg_dnl(bad)


# --------------------------------------------------------------------------------------- the DNL authors' block
def official_state(c=16, p=8, use_out=False, out_bn=False, gamma=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"gamma": torch.tensor([gamma], dtype=DT)}
    for m in ("conv_query", "conv_key"):
        sd[f"{m}.weight"], sd[f"{m}.bias"] = randn(p, c, 1, 1, g=g), randn(p, g=g)
    if use_out:
        sd["conv_value.weight"], sd["conv_value.bias"] = randn(p, c, 1, 1, g=g), randn(p, g=g)
        sd["conv_out.weight"] = randn(c, p, 1, 1, g=g)
    else:
        sd["conv_value.weight"] = randn(c, c, 1, 1, g=g)
    sd["conv_mask.weight"], sd["conv_mask.bias"] = randn(1, c, 1, 1, g=g), randn(1, g=g)
    if out_bn:
        sd.update({"out_bn.weight": 1 + randn(c, g=g), "out_bn.bias": randn(c, g=g),
                   "out_bn.running_mean": randn(c, g=g), "out_bn.running_var": 0.5 + randn(c, g=g).abs(),
                   "out_bn.num_batches_tracked": torch.tensor(3)})
    return sd


def official_dnl(sd, x, temperature=0.05, train=False):
    """_NonLocalNd_bn.forward with downsample=False, whiten_type=['channel'], with_gc=True, with_unary=False."""
    b, c, h, w = x.shape

    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    q = conv("conv_query", x).reshape(b, -1, h * w)  # (B, P, N)
    k = conv("conv_key", x).reshape(b, -1, h * w)
    v = conv("conv_value", x).reshape(b, -1, h * w)
    q, k = q - q.mean(2, keepdim=True), k - k.mean(2, keepdim=True)
    sim = torch.softmax(q.transpose(1, 2) @ k / q.shape[1] ** 0.5 / temperature, 2)  # (B, N, N)
    out = sd["gamma"] * (sim @ v.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    mask = torch.softmax(conv("conv_mask", x).reshape(b, 1, h * w), 2)
    out = out + (v @ mask.transpose(1, 2)).unsqueeze(-1)  # (B, C_v, 1, 1), broadcast
    if "conv_out.weight" in sd:
        out = F.conv2d(out, sd["conv_out.weight"])
    if "out_bn.weight" in sd:
        out = F.batch_norm(out, sd["out_bn.running_mean"].clone(), sd["out_bn.running_var"].clone(),
                           sd["out_bn.weight"], sd["out_bn.bias"], training=train, eps=1e-5)
    return out + x


@pytest.mark.parametrize("use_out, out_bn", [(False, False), (True, False), (True, True), (False, True)])
def test_official_dnl(use_out, out_bn):
    sd = official_state(use_out=use_out, out_bn=out_bn)
    block = from_official_dnl({"nlm.ctb." + k: v for k, v in sd.items()}, prefix="nlm.ctb.")
    x = randn(2, 16, 5, 6, g=torch.Generator().manual_seed(1), std=1.0)
    for train in (False, True):
        block.train(train)
        assert_close(block(x), official_dnl(sd, x, train=train))
    assert_close(block.edges.gamma, sd["gamma"])
    frozen = {n for n, t in block.named_parameters() if not t.requires_grad}
    assert frozen == ({"units.0.w.0.bias"} if use_out else {"units.0.g.bias"})
    # γ's gradient equals the literal module's
    leaf = sd["gamma"].clone().requires_grad_(True)
    wt = randn(2, 16, 5, 6, g=torch.Generator().manual_seed(2), std=1.0)
    (official_dnl({**sd, "gamma": leaf}, x, train=True) * wt).sum().backward()
    block.zero_grad()
    (block.train()(x) * wt).sum().backward()
    assert_close(block.edges.gamma.grad, leaf.grad)


def test_official_dnl_gamma_zero_is_the_unary_term_alone():
    sd = official_state(gamma=0.0, seed=3)
    block = from_official_dnl(sd, temperature=0.2)
    x = randn(1, 16, 4, 4, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), official_dnl(sd, x, temperature=0.2))
    a = torch.softmax(block.edges.unary_logits(x.flatten(2).transpose(1, 2)), -1)
    assert_close(block.affinity(x), a[:, None, :].expand(1, 16, 16))


def test_official_dnl_errors():
    sd = official_state()
    with pytest.raises(NotImplementedError, match="downsample=True"):
        from_official_dnl(sd, downsample=True)
    with pytest.raises(NotImplementedError, match="whiten_type 'bn'"):
        from_official_dnl(dict(sd, **{"key_bn.running_mean": torch.zeros(8, dtype=DT)}))
    with pytest.raises(ValueError, match=r"missing keys \['conv_mask.weight', 'conv_mask.bias'\].*with_gc=False"):
        from_official_dnl({k: v for k, v in sd.items() if not k.startswith("conv_mask")})
    with pytest.raises(ValueError, match=r"missing keys \['gamma'\]"):
        from_official_dnl({k: v for k, v in sd.items() if k != "gamma"})
    bad = dict(sd, **{"conv_value.weight": torch.zeros(8, 16, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'conv_value.weight' has shape \(8, 16, 1, 1\), expected \(16, 16, 1, 1\)"):
        from_official_dnl(bad)
    with pytest.raises(ValueError, match="temperature"):
        from_official_dnl(sd, temperature=-1)
