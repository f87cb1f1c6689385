"""Backbones (shapes, parameter counts, names) and nonlocal-block insertion."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import Tokens
from torch import nn

from nonlocalnet.models import (
    PLACEMENT_KEYS,
    BlockChain,
    Inserted,
    PreActBasicBlock,
    PreActBottleneck,
    PreResNet,
    build_model,
    get_module,
    insert_blocks,
    inserted_blocks,
    list_models,
    remap_state_dict,
    resolve_placement,
)

torch.set_num_threads(1)

ALL_ARCHS = [
    "preresnet20",
    "preresnet56",
    "preresnet110",
    "preresnet164",
    "preresnet8",
    "resnet50",
    "resnet50_cifar",
    "resnet3d18",
    "resnet3d50",
]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Stub(nn.Module):
    """Shape-preserving stand-in for a nonlocal block: ``x + alpha * conv1x1(x)`` (identity for alpha=0)."""

    def __init__(self, name: str, in_channels: int, dim: int = 2, scale: float = 0.0, **options):
        super().__init__()
        self.name, self.in_channels, self.dim, self.options = name, in_channels, dim, options
        self.proj = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](in_channels, in_channels, 1)
        self.alpha = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.in_channels and x.dim() == self.dim + 2
        return x + self.alpha * self.proj(x)


class Factory:
    """Records every call ``(name, in_channels, dim, options)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, dict]] = []

    def __call__(self, name: str, in_channels: int, *, dim: int = 2, **options) -> nn.Module:
        self.calls.append((name, in_channels, dim, dict(options)))
        return Stub(name, in_channels, dim=dim, **options)


class AddOne(nn.Module):
    def __init__(self, name: str, in_channels: int, dim: int = 2, **options):
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


def toy() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1))


# ------------------------------------------------------------------------------------------ backbones

# (arch, num_classes, exact count, published figure)
PARAMS = [
    ("preresnet20", 10, 272_282, 0.27e6),
    ("preresnet56", 10, 855_578, 0.85e6),
    ("preresnet110", 10, 1_730_522, 1.7e6),
    ("preresnet164", 10, 1_703_258, 1.7e6),
    ("resnet50", 1000, 25_557_032, 25.56e6),
    ("resnet50_cifar", 100, 23_705_252, 23.7e6),
    ("resnet3d18", 400, 33_409_104, 33.2e6),  # Hara et al. 2018 (shortcut A); ours uses B (1x1x1 convs)
    ("resnet3d50", 400, 47_018_576, 46.4e6),
]


@pytest.mark.parametrize("arch,classes,exact,published", PARAMS)
def test_param_counts(arch, classes, exact, published):
    count = n_params(build_model(arch, classes))
    assert count == exact
    assert abs(count - published) / published < 0.03


def test_preresnet56_bottleneck_variant():
    m = build_model("preresnet56", 10, bottleneck=True)
    assert n_params(m) == 590_426
    assert len(m.stage1) == len(m.stage2) == len(m.stage3) == 6
    assert isinstance(m.stage1[0], PreActBottleneck) and m.num_features == 256
    basic = build_model("preresnet56", 10)
    assert len(basic.stage1) == 9 and isinstance(basic.stage1[0], PreActBasicBlock)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_output_shapes(arch):
    m = build_model(arch, 7).eval()
    x = torch.randn(1, 3, 4, 32, 32) if "3d" in arch else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert m(x).shape == (x.shape[0], 7)


def test_feature_shapes_and_names():
    m = build_model("preresnet20", 10).eval()
    names = [n for n, _ in m.named_children()]
    assert names == ["stem", "stage1", "stage2", "stage3", "final_bn", "head"]
    expected = {"stage1.0.conv1.weight", "stage2.0.shortcut.weight", "final_bn.weight", "head.bias"}
    assert expected <= set(m.state_dict())
    with torch.no_grad():
        assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)

    r = build_model("resnet50", 1000)
    keys = set(r.state_dict())  # torchvision-compatible names
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer3.5.conv2.weight",
    } <= keys
    assert {"layer4.2.bn3.weight", "fc.weight"} <= keys
    assert [len(getattr(r, f"layer{k}")) for k in range(1, 5)] == [3, 4, 6, 3]
    with torch.no_grad():
        assert r.eval().forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
        c = build_model("resnet50_cifar", 10).eval()
        assert isinstance(c.maxpool, nn.Identity) and c.conv1.kernel_size == (3, 3)
        assert c.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 2048, 4, 4)
        v = build_model("resnet3d18", 5).eval()
        assert v.conv1.kernel_size == (7, 7, 7) and v.conv1.stride == (1, 2, 2)
        assert v.forward_features(torch.randn(1, 3, 4, 32, 32)).shape == (1, 512, 1, 1, 1)


def test_build_model_errors():
    assert list_models() == ALL_ARCHS
    with pytest.raises(ValueError, match="unknown arch 'resnet51'.*preresnet20.*resnet3d50"):
        build_model("resnet51", 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        PreResNet(21)
    with pytest.raises(ValueError, match="9n\\+2"):
        PreResNet(26, bottleneck=True)


# ----------------------------------------------------------------------------------------- placements


def test_resolve_named_placements():
    pre = build_model("preresnet20", 10)
    for k in (1, 2, 3):
        p = resolve_placement(pre, {"stage": k, "after_block": 2, "block": "snl"})
        assert (p["at"], p["where"]) == (f"stage{k}.1", "after")
        assert p["units"] == 1 and p["count"] == 1 and p["dim"] is None and p["options"] == {}
    assert resolve_placement(pre, {"stage": 2, "before_block": 1})["at"] == "stage2.0"
    assert resolve_placement(pre, {"stage": 3})["at"] == "stage3"
    assert resolve_placement(pre, {"stage": 3, "after_last": True})["at"] == "stage3.2"

    r50 = build_model("resnet50", 1000)
    p = resolve_placement(r50, {"res": 4, "before_last": True, "block": "nl"})
    assert (p["at"], p["where"]) == ("layer3.5", "before")
    assert resolve_placement(r50, {"stage": 1, "after_block": 1})["at"] == "layer1.0"
    assert resolve_placement(r50, {"at": "layer2", "after_block": 3})["at"] == "layer2.2"
    v18 = build_model("resnet3d18", 10)
    assert resolve_placement(v18, {"res": 4, "before_last": True})["at"] == "layer3.1"
    assert set(PLACEMENT_KEYS) >= {"at", "where", "block", "units", "count", "dim", "options"}


def test_placement_errors():
    pre = build_model("preresnet20", 10)
    with pytest.raises(ValueError, match=r"'stage1\.7'.*stage1\.0, stage1\.1, stage1\.2"):
        resolve_placement(pre, {"at": "stage1.7"})
    with pytest.raises(ValueError, match=r"'stag1'.*closest module names: stage1"):
        resolve_placement(pre, {"at": "stag1"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'after'.*valid keys: at, where, block"):
        resolve_placement(pre, {"at": "stage1", "after": 1})
    with pytest.raises(ValueError, match="exactly one of"):
        resolve_placement(pre, {"at": "stage1", "stage": 1})
    with pytest.raises(ValueError, match="has only 3 blocks"):
        resolve_placement(pre, {"stage": 1, "after_block": 4})
    with pytest.raises(ValueError, match="implies where='before'"):
        resolve_placement(pre, {"stage": 1, "before_last": True, "where": "after"})
    with pytest.raises(ValueError, match="'where' must be"):
        resolve_placement(pre, {"at": "stage1", "where": "inside"})
    with pytest.raises(ValueError, match="'stage4' or 'layer4'"):
        resolve_placement(pre, {"stage": 4})
    with pytest.raises(ValueError, match="'units' must be an integer >= 1"):
        resolve_placement(pre, {"at": "stage1", "units": 0})
    with pytest.raises(ValueError, match="top-level placement keys"):
        resolve_placement(pre, {"at": "stage1", "options": {"units": 2}})
    with pytest.raises(ValueError, match="lacks the 'block' key"):
        insert_blocks(pre, {"at": "stage1"}, factory=Factory())
    with pytest.raises(ValueError, match="dim=3 but"):
        insert_blocks(pre, {"at": "stage1", "block": "x", "dim": 3}, factory=Factory())
    assert not any(isinstance(m, Inserted) for m in pre.modules())  # nothing half-inserted


# ------------------------------------------------------------------------------------------ insertion


def test_channels_inferred_and_identity_preserves_output():
    model = build_model("preresnet20", 10).eval()
    reference = copy.deepcopy(model)
    f = Factory()
    placements = [{"stage": k, "after_block": 2, "block": "snl", "options": {"k": 2}} for k in (1, 2, 3)]
    assert insert_blocks(model, placements, factory=f) is model
    assert [(c[1], c[2]) for c in f.calls] == [(16, 2), (32, 2), (64, 2)]
    assert all(c[0] == "snl" and c[3] == {"k": 2} for c in f.calls)
    assert isinstance(model.stage2[1], Inserted) and model.stage2[1].where == "after"
    assert not model.training and not model.stage2[1].nonlocal_block.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        model.stage2[1].nonlocal_block.alpha.fill_(0.5)
        assert not torch.allclose(model(x), reference(x))


def test_state_dict_keys_and_remap():
    model = build_model("preresnet20", 10)
    original = copy.deepcopy(model.state_dict())
    insert_blocks(model, {"stage": 2, "after_block": 2, "block": "b"}, factory=Factory())
    keys = set(model.state_dict())
    assert "stage2.1.module.conv1.weight" in keys and "stage2.1.conv1.weight" not in keys
    assert {"stage2.1.nonlocal_block.alpha", "stage2.1.nonlocal_block.proj.weight"} <= keys
    assert "stage2.0.conv1.weight" in keys  # untouched siblings keep their names
    assert set(inserted_blocks(model)) == {"stage2.1.nonlocal_block"}
    missing, unexpected = model.load_state_dict(remap_state_dict(model, original), strict=False)
    assert sorted(missing) == ["stage2.1.nonlocal_block.alpha", "stage2.1.nonlocal_block.proj.bias",
                               "stage2.1.nonlocal_block.proj.weight"]  # fmt: skip
    assert unexpected == []
    # attribute and index access fall through the wrapper
    assert model.stage2[1].conv1 is model.stage2[1].module.conv1
    assert get_module(model, "stage2.1.conv1") is model.stage2[1].module.conv1


def test_before_and_after():
    x = torch.randn(2, 3, 5, 5)
    for where, channels in (("before", 4), ("after", 8)):
        model = toy()
        ref = copy.deepcopy(model)
        f = Factory()
        insert_blocks(model, {"at": "2", "where": where, "block": "b"}, factory=f)  # shape guessed from conv
        assert f.calls[0][1:3] == (channels, 2)
        model[2].nonlocal_block = AddOne("b", channels)
        with torch.no_grad():
            h = ref[1](ref[0](x))
            expected = ref[2](h + 1.0) if where == "before" else ref[2](h) + 1.0
            torch.testing.assert_close(model(x), expected)


def test_count_vs_units_vs_places():
    model = build_model("preresnet20", 10)
    f = Factory()
    insert_blocks(model, {"stage": 1, "after_block": 2, "block": "snl", "units": 3}, factory=f)
    assert len(f.calls) == 1 and f.calls[0][3] == {"units": 3}
    assert isinstance(model.stage1[1].nonlocal_block, Stub)

    model = build_model("preresnet20", 10)
    f = Factory()
    insert_blocks(model, {"stage": 1, "after_block": 2, "block": "snl", "count": 3}, factory=f)
    assert len(f.calls) == 3 and all(c[3] == {} and c[1] == 16 for c in f.calls)
    chain = model.stage1[1].nonlocal_block
    assert isinstance(chain, BlockChain) and len(chain) == 3
    assert list(inserted_blocks(model)) == [f"stage1.1.nonlocal_block.{i}" for i in range(3)]
    assert "stage1.1.nonlocal_block.2.alpha" in model.state_dict()

    model = build_model("preresnet20", 10)
    places = [{"stage": 1, "after_block": j, "block": "snl"} for j in (1, 2, 3)]
    insert_blocks(model, places, factory=Factory())
    assert list(inserted_blocks(model)) == [f"stage1.{i}.nonlocal_block" for i in range(3)]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_nested_and_repeated_insertions():
    model = build_model("preresnet20", 10).eval()
    ref = copy.deepcopy(model)
    f = Factory()
    placements = [
        {"at": "stage2", "block": "a"},
        {"at": "stage2.1", "block": "b"},
        {"at": "stage2.1", "block": "c"},
    ]
    insert_blocks(model, placements, factory=f)
    assert [c[1] for c in f.calls] == [32, 32, 32]
    keys = set(model.state_dict())
    assert {"stage2.nonlocal_block.alpha", "stage2.module.1.nonlocal_block.alpha"} <= keys
    assert {
        "stage2.module.1.module.nonlocal_block.alpha",
        "stage2.module.1.module.module.conv1.weight",
    } <= keys
    assert len(inserted_blocks(model)) == 3
    # a later call still uses original names
    insert_blocks(model, {"res": 4, "before_last": True, "block": "d"}, factory=f)
    assert f.calls[-1][1] == 64 and isinstance(model.stage3[2], Inserted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    missing, unexpected = model.load_state_dict(remap_state_dict(model, ref.state_dict()), strict=False)
    assert unexpected == [] and all("nonlocal_block" in k for k in missing) and len(missing) == 4 * 3


RES4 = [("resnet3d18", "layer3.1", 256), ("resnet50_cifar", "layer3.5", 1024)]


@pytest.mark.parametrize("arch,at,channels", RES4)
def test_res4_before_last(arch, at, channels):
    model = build_model(arch, 10)
    f = Factory()
    insert_blocks(model, {"res": 4, "before_last": True, "block": "nl"}, factory=f)
    dim = 3 if "3d" in arch else 2
    assert f.calls == [("nl", channels, dim, {})]
    assert model.training and isinstance(get_module(model, at), Inserted)
    assert get_module(model, at).where == "before"


def test_dry_run_inputs_and_dtype():
    model = toy().double()
    f = Factory()
    insert_blocks(model, {"at": "0", "block": "b"}, factory=f, input_shape=(3, 6, 6))
    assert model[0].nonlocal_block.proj.weight.dtype == torch.float64
    # explicit in_channels + dim: no dry forward at all (the model could not even run on a guess)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="cannot guess an input shape"):
        insert_blocks(seq, {"at": "1", "block": "b"}, factory=f)
    insert_blocks(model, {"at": "2", "block": "b", "in_channels": 8, "dim": 2}, factory=f)
    assert f.calls[-1][1:3] == (8, 2)
    m3 = nn.Sequential(nn.Conv3d(3, 5, 1), nn.Conv3d(5, 2, 1))
    insert_blocks(m3, {"at": "0", "block": "b"}, factory=f, example_input=torch.zeros(1, 3, 2, 4, 4))
    assert f.calls[-1][1:3] == (5, 3)


def test_shape_errors_from_dry_run():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.ReLU()
            self.unused = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    m = Shared()
    with pytest.raises(ValueError, match="'relu' sees tensors of shapes"):
        insert_blocks(m, {"at": "relu", "block": "b"}, factory=Factory())
    with pytest.raises(ValueError, match="'unused' was not called"):
        insert_blocks(m, {"at": "unused", "block": "b"}, factory=Factory())
    assert m.training and not any(isinstance(x, Inserted) for x in m.modules())


def test_real_build_block():
    model = build_model("preresnet20", 10).eval()
    insert_blocks(model, [{"stage": 2, "after_block": 2, "block": "nl"}])
    block = model.stage2[1].nonlocal_block
    assert block.in_channels == 32 and block.dim == 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_strip_blocks_gives_the_backbone_back():
    from nonlocalnet.models import build_model, insert_blocks, strip_blocks

    torch.manual_seed(0)
    net = build_model("preresnet20", num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    insert_blocks(net, [{"stage": 1, "after_block": 2, "block": "snl"}, {"stage": 2, "after_block": 1, "block": "nl",
                                                                       "count": 2}], input_shape=(3, 32, 32))
    insert_blocks(net, [{"stage": 1, "after_block": 2, "block": "ns"}], input_shape=(3, 32, 32))  # nested wrapper
    bare = strip_blocks(net)
    assert set(bare.state_dict()) == set(before)
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in before.items())
    assert sum(p.numel() for p in bare.parameters()) == sum(v.numel() for k, v in before.items()
                                                           if not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked")))
    assert len([m for m in net.modules() if type(m).__name__ == "NonlocalBlock"]) == 4  # net itself untouched
    x = torch.randn(2, 3, 32, 32)
    ref = build_model("preresnet20", num_classes=10)
    ref.load_state_dict(before)
    assert torch.allclose(bare.eval()(x), ref.eval()(x))


# ------------------------------------------------------------------------------ any model: arch specs, layouts


def test_register_model_and_factory_specs():
    from nonlocalnet.models import register_model

    def tiny(num_classes=10, width=4):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    register_model("tinynet_for_test", tiny)
    assert "tinynet_for_test" in list_models()
    m = build_model("tinynet_for_test", 7, width=6)
    assert m[0].out_channels == 6 and m[-1].out_features == 7
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_model("tinynet_for_test", lambda **k: tiny(**k))
    with pytest.raises(ValueError, match="'resnet50' is a bundled model"):
        register_model("resnet50", tiny)
    with pytest.raises(ValueError, match="without ':'"):
        register_model("a:b", tiny)
    # package.module:callable, with num_classes passed when the signature takes it
    m = build_model("nonlocalnet.models.preresnet:PreResNet", 5, depth=20)
    assert isinstance(m, PreResNet) and m.head.out_features == 5
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        build_model("no_such_pkg_xyz.mod:f", 10)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        build_model("nonlocalnet.models:nope", 10)
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model("builtins:dict", 10)
    with pytest.raises(ValueError, match=r"unknown arch 'resnet51'.*timm:NAME"):
        build_model("resnet51", 10)
    with pytest.raises(ValueError, match=r"unknown arch 'torchvision.resnet50' \(did you mean 'torchvision:resnet50'"):
        build_model("torchvision.resnet50", 10)


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_missing_extra_names_the_install(lib):
    try:
        __import__(lib)
    except ImportError:
        pass
    else:
        pytest.skip(f"{lib} is installed here")
    with pytest.raises(ValueError, match=rf"needs {lib}, which is not installed.*pip install nonlocalnet\[vision\]"):
        build_model(f"{lib}:resnet50", 10)


class NHWC(nn.Module):
    """Channels-last features (B, H, W, C) between LayerNorms and Linears, like a Swin stage."""

    def __init__(self, c=12):
        super().__init__()
        self.embed = nn.Linear(3, c)
        self.stage = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
        self.head = nn.Linear(c, 4)

    def forward(self, x):  # x (B, 3, H, W)
        return self.head(self.stage(self.embed(x.permute(0, 2, 3, 1))).mean((1, 2)))


def test_channels_last_features_from_layer_widths():
    m = NHWC()
    insert_blocks(m, {"at": "stage", "block": "snl"}, input_shape=(3, 5, 7))
    w = m.stage
    assert (w.layout.kind, w.layout.spatial, w.layout.channels) == ("channels_last", (5, 7), 12)
    assert "widths of the model's linear" in w.layout.source
    x = torch.randn(2, 3, 5, 7)
    feats = m.stage.module(m.embed(x.permute(0, 2, 3, 1)))
    ref = w.nonlocal_block(feats.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(w(m.embed(x.permute(0, 2, 3, 1))), ref)
    # the same features declared channels-first are 5 channels at 7 positions... of a 1-D axis? no: (B, 5, 7, 12)
    # is 4-D, so channels-first reads C=5 over a 7x12 grid; the key is obeyed, and in_channels catches a mistake
    with pytest.raises(ValueError, match=r"in_channels=12 but the tensor has 5 \(channels_first features"):
        insert_blocks(NHWC(), {"at": "stage", "block": "nl", "layout": "channels_first", "in_channels": 12},
                      input_shape=(3, 5, 7))


def test_tokens_need_their_grid_and_keep_prefix_tokens():
    m = Tokens()
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 17, 12\).*need their grid.*'grid': \[h, w\]"):
        insert_blocks(m, {"at": "blocks", "block": "nl"}, input_shape=(3, 16, 16))
    insert_blocks(m, {"at": "blocks", "block": "snl", "grid": [4, 4]}, input_shape=(3, 16, 16))
    w = m.blocks
    assert (w.layout.kind, w.layout.spatial, w.layout.prefix) == ("tokens", (4, 4), 1)
    assert w.placement["prefix_tokens"] == 1 and w.placement["layout"] == "tokens"
    t = torch.randn(2, 17, 12)
    out = w(t)
    inner = w.module(t)
    assert torch.equal(out[:, :1], inner[:, :1])  # the class token passes through unchanged
    ref = w.nonlocal_block(inner[:, 1:].transpose(1, 2).reshape(2, 12, 4, 4)).reshape(2, 12, 16).transpose(1, 2)
    assert torch.equal(out[:, 1:], ref)
    with pytest.raises(ValueError, match=r"do not fit grid \[4, 4\] with 2 prefix token"):
        insert_blocks(Tokens(), {"at": "blocks", "block": "nl", "grid": [4, 4], "prefix_tokens": 2},
                      input_shape=(3, 16, 16))


def test_ambiguous_layout_is_an_error():
    # (B, 12, 4, 12): dim 1 is a conv's channel count and the last dim a linear layer's width
    m = nn.Sequential(nn.Conv2d(3, 12, 1), nn.Flatten(0, 0), nn.Linear(12, 12))
    with pytest.raises(ValueError, match=r"cannot tell the layout of features of shape \(2, 12, 4, 12\).*'layout'"):
        insert_blocks(m, {"at": "0", "block": "nl"}, input_shape=(3, 4, 12))
    insert_blocks(m, {"at": "0", "block": "nl", "layout": "channels_first"}, input_shape=(3, 4, 12))
    assert (m[0].layout.kind, m[0].nonlocal_block.in_channels) == ("channels_first", 12)


@pytest.mark.parametrize("spec,match", [
    ({"layout": "nhwc"}, "'layout' must be one of channels_first, channels_last, tokens"),
    ({"grid": [0, 4]}, "'grid' must be a list of 1 to 3 positive integers"),
    ({"grid": "14x14"}, "'grid' must be a list"),
    ({"layout": "channels_last", "grid": [4, 4]}, "'grid' is for layout 'tokens'"),
    ({"prefix_tokens": -1}, "'prefix_tokens' must be an integer >= 0"),
    ({"grid": [4, 4], "dim": 3}, r"dim=3 but grid \[4, 4\] has 2 axes"),
])
def test_layout_keys_are_checked(spec, match):
    from nonlocalnet.models.placement import check_placement

    with pytest.raises(ValueError, match=match):
        check_placement({"at": "x", "block": "nl", **spec})


def test_dry_run_error_names_the_shape_and_its_source():
    class Fixed(nn.Module):  # runs on 3x32x32 only (a flattening head), and says nothing about it
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(ValueError, match=r"dry forward pass .* failed on an input of shape \(2, 3, 64, 64\) \(a guess "
                                         r"from the model's first Conv2d .*\): RuntimeError.*input_shape="):
        insert_blocks(Fixed(), {"at": "conv", "block": "nl"})
    m = insert_blocks(Fixed(), {"at": "conv", "block": "nl"}, input_shape=(3, 32, 32))
    assert m.conv.nonlocal_block.in_channels == 4
    # what the model says comes first
    said = Fixed()
    said.pretrained_cfg = {"input_size": (3, 32, 32)}
    assert insert_blocks(said, {"at": "conv", "block": "nl"}).conv.layout.spatial == (32, 32)


def test_fx_symbolic_trace_keeps_the_block_a_leaf():
    model = build_model("preresnet20", 10).eval()
    insert_blocks(model, {"stage": 2, "after_block": 1, "block": "snl"})
    gm = torch.fx.symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "stage2.0.nonlocal_block" in calls
    assert not any(c.startswith("stage2.0.nonlocal_block.") for c in calls)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    tok = Tokens()
    insert_blocks(tok, {"at": "blocks", "block": "nl", "grid": [4, 4]}, input_shape=(3, 16, 16))
    gt = torch.fx.symbolic_trace(tok)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(gt(x), tok(x))


def test_config_placement_is_the_one_schema():
    import dataclasses

    from nonlocalnet.runs import BlockPlacement, ConfigError, config_from_dict

    assert {f.name for f in dataclasses.fields(BlockPlacement)} == set(PLACEMENT_KEYS)
    cfg = config_from_dict({"model": {"arch": "timm:vit_tiny_patch16_224", "blocks": [
        {"at": "blocks.5", "block": "nl", "layout": "tokens", "grid": [14, 14], "prefix_tokens": 1}]}})
    assert cfg.model.blocks[0].to_dict() == {"at": "blocks.5", "block": "nl", "units": 1, "count": 1, "options": {},
                                             "layout": "tokens", "grid": [14, 14], "prefix_tokens": 1}
    with pytest.raises(ConfigError, match="'grid' is for layout 'tokens', not 'channels_last'"):
        config_from_dict({"model": {"blocks": [{"at": "x", "layout": "channels_last", "grid": [2, 2]}]}})
