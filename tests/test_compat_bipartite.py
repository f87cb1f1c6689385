"""from_efficient_attention and from_external_attention against literal re-implementations.

Each reference below is written from the public module's parameter layout and forward, on the raw state-dict
tensors with torch.nn.functional only (no nonlocalnet code): the Efficient Attention authors' ``EfficientAttention``
(Shen et al., WACV 2021; one head) and the External Attention authors' ``External_attention`` (Guo et al., TPAMI
2022; EANet). float64, 1e-10; BatchNorm in train mode (batch statistics and the running-stat update) and eval mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nonlocalnet.compat import from_efficient_attention, from_external_attention

DT = torch.float64


def randn(*shape, g, std=0.4):
    return torch.randn(*shape, generator=g, dtype=DT) * std


# --------------------------------------------------------------------------------------- Efficient Attention
def efficient_state(c=8, ck=4, cv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, o, i in (("keys", ck, c), ("queries", ck, c), ("values", cv, c), ("reprojection", c, cv)):
        sd[f"{m}.weight"], sd[f"{m}.bias"] = randn(o, i, 1, 1, g=g), randn(o, g=g)
    return sd


def efficient_attention(sd, x, head_count=1):
    """EfficientAttention.forward: per head (an equal channel group of the keys, queries and values), keys
    softmaxed over positions, queries over the head's channels, context = keys valuesᵀ, attended = contextᵀ
    queries; the heads concatenated, reprojection, plus the input."""
    n, _, h, w = x.shape
    keys = F.conv2d(x, sd["keys.weight"], sd["keys.bias"]).reshape(n, -1, h * w)
    queries = F.conv2d(x, sd["queries.weight"], sd["queries.bias"]).reshape(n, -1, h * w)
    values = F.conv2d(x, sd["values.weight"], sd["values.bias"]).reshape(n, -1, h * w)
    hk, hv = keys.shape[1] // head_count, values.shape[1] // head_count
    attended = []
    for i in range(head_count):
        key = torch.softmax(keys[:, i * hk:(i + 1) * hk], dim=2)
        query = torch.softmax(queries[:, i * hk:(i + 1) * hk], dim=1)
        context = key @ values[:, i * hv:(i + 1) * hv].transpose(1, 2)
        attended.append((context.transpose(1, 2) @ query).reshape(n, hv, h, w))
    return F.conv2d(torch.cat(attended, 1), sd["reprojection.weight"], sd["reprojection.bias"]) + x


@pytest.mark.parametrize("ck,cv", [(4, 6), (8, 8), (3, 5)])
def test_efficient_attention(ck, cv):
    sd = efficient_state(ck=ck, cv=cv)
    block = from_efficient_attention({"head.att." + k: v for k, v in sd.items()}, prefix="head.att.")
    x = randn(2, 8, 5, 7, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), efficient_attention(sd, x), rtol=1e-10, atol=1e-10)
    assert block.name == "efficient" and block.edges.theta.weight.shape == (ck, 8, 1, 1)
    assert block.units[0].g.weight.shape == (cv, 8, 1, 1)


@pytest.mark.parametrize("heads,ck,cv", [(2, 4, 6), (4, 8, 8), (3, 6, 3)])
def test_efficient_attention_heads(heads, ck, cv):
    sd = efficient_state(ck=ck, cv=cv)
    block = from_efficient_attention(sd, head_count=heads)
    x = randn(2, 8, 5, 7, g=torch.Generator().manual_seed(1), std=1.0)
    assert_close(block(x), efficient_attention(sd, x, heads), rtol=1e-10, atol=1e-10)
    assert block.edges.heads == heads
    assert (block(x) - efficient_attention(sd, x)).abs().max() > 1e-3  # one softmax over all channels differs


def test_efficient_attention_errors():
    sd = efficient_state()
    with pytest.raises(ValueError, match=r"head_count \(3\) must divide the key channels \(4\) and the value "
                                         r"channels \(6\)"):
        from_efficient_attention(sd, head_count=3)
    with pytest.raises(ValueError, match="head_count: expected a positive int"):
        from_efficient_attention(sd, head_count=0)
    bad = {k: v for k, v in sd.items() if k != "keys.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['keys.bias'\]"):
        from_efficient_attention(bad)
    bad = dict(sd, **{"keys.weight": torch.zeros(3, 8, 1, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'keys.weight' has shape \(3, 8, 1, 1\), expected \(4, 8, 1, 1\)"):
        from_efficient_attention(bad)


# --------------------------------------------------------------------------------------- External Attention
def external_state(c=8, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": randn(c, c, 1, 1, g=g), "conv1.bias": randn(c, g=g),
            "linear_0.weight": randn(s, c, 1, g=g), "linear_1.weight": randn(c, s, 1, g=g),
            "conv2.0.weight": randn(c, c, 1, 1, g=g), "conv2.1.weight": 1 + randn(c, g=g),
            "conv2.1.bias": randn(c, g=g), "conv2.1.running_mean": randn(c, g=g),
            "conv2.1.running_var": 1 + randn(c, g=g).abs(), "conv2.1.num_batches_tracked": torch.tensor(7)}


def external_attention(sd, x, training):
    """External_attention.forward: conv1, linear_0 (M_k), softmax over the positions, l1 over the S slots with
    1e-9, linear_1 (M_v), conv2 = conv (no bias) + BatchNorm2d, the residual, ReLU. The BatchNorm updates the
    running statistics of ``sd`` in place in training mode (momentum 0.1), as nn.BatchNorm2d does."""
    idn = x
    t = F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"])
    b, c, h, w = t.shape
    t = t.reshape(b, c, h * w)
    attn = F.conv1d(t, sd["linear_0.weight"])
    attn = F.softmax(attn, dim=-1)
    attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
    t = F.conv1d(attn, sd["linear_1.weight"]).reshape(b, c, h, w)
    t = F.conv2d(t, sd["conv2.0.weight"])
    t = F.batch_norm(t, sd["conv2.1.running_mean"], sd["conv2.1.running_var"], sd["conv2.1.weight"],
                     sd["conv2.1.bias"], training=training, momentum=0.1, eps=1e-5)
    return F.relu(t + idn)


@pytest.mark.parametrize("training", [True, False])
def test_external_attention(training):
    sd = external_state()
    block = from_external_attention({"linu." + k: v.clone() for k, v in sd.items()}, prefix="linu.")
    block.train(training)
    x = randn(2, 8, 4, 6, g=torch.Generator().manual_seed(1), std=1.0)
    want = external_attention(sd, x, training)
    assert_close(F.relu(block(x)), want, rtol=1e-10, atol=1e-10)
    assert block.name == "external" and block.edges.memory.weight.shape == (5, 8, 1, 1)
    bn = block.units[0].norm.bn
    assert_close(bn.running_mean, sd["conv2.1.running_mean"], rtol=1e-12, atol=1e-12)  # the same update
    assert_close(bn.running_var, sd["conv2.1.running_var"], rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 7 + int(training)


def test_external_attention_errors():
    sd = external_state()
    bad = {k: v for k, v in sd.items() if k != "linear_1.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['linear_1.weight'\]"):
        from_external_attention(bad)
    bad = dict(sd, **{"linear_1.weight": torch.zeros(8, 4, 1, dtype=DT)})
    with pytest.raises(ValueError, match=r"'linear_1.weight' has shape \(8, 4, 1\), expected \(8, 5, 1\)"):
        from_external_attention(bad)
    bad = dict(sd, **{"conv2.0.bias": torch.zeros(8, dtype=DT)})
    with pytest.raises(ValueError, match=r"unexpected keys \['conv2.0.bias'\]"):
        from_external_attention(bad)
