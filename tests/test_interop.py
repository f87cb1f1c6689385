"""torchvision and timm models through insert, fx, compile, train, eval and analyze (``make test-interop``).

Marked ``interop``: ``make test`` deselects them (and without torchvision / timm they skip). Small inputs, few
presets on the big models, every preset on one small model (timm resnet18), so the suite stays short on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _util import run_docs_example
from test_data import make_cifar10

from nonlocalnet import NonlocalBlock, list_blocks
from nonlocalnet.models import build_model, get_module, insert_blocks, inserted_blocks, strip_blocks
from nonlocalnet.runs import Loaded

pytestmark = pytest.mark.interop
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg  # noqa: E402
from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

from nonlocalnet.integrations.timm import attn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZERO_INIT = ("nl", "ns", "cc", "gc", "dnl", "axial", "neighborhood")  # presets whose new block is the identity
# (zero-initialized output). The 2 x 2 maps below are smaller than neighborhood's default 3 x 3 window (an error)
SMALL_MAP_OPTIONS = {"neighborhood": {"kernel_size": 1}}


def _blocks(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Inserted"}


def _randomize_blocks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in inserted_blocks(model).values():
            for p in b.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# --------------------------------------------------------------------------------- every preset, small model


@pytest.mark.parametrize("preset", list_blocks())
def test_every_preset_in_timm_resnet18(preset, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    m = build_model("timm:resnet18", 10)
    placement = {"res": 4, "before_last": True, "block": preset, "options": SMALL_MAP_OPTIONS.get(preset, {})}
    insert_blocks(m, placement, input_shape=(3, 32, 32))
    wrapper = get_module(m, "layer3.1")
    assert type(wrapper).__name__ == "Inserted" and wrapper.where == "before"
    block = wrapper.nonlocal_block
    assert (block.in_channels, block.dim, wrapper.layout.kind) == (256, 2, "channels_first")
    m.eval()
    y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    if preset in ZERO_INIT:
        assert torch.equal(y, strip_blocks(m).eval()(x))
    m.train()
    m(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    # state-dict round trip into a fresh model with the same placement
    torch.save(m.state_dict(), tmp_path / "w.pt")
    m2 = insert_blocks(build_model("timm:resnet18", 10), placement, input_shape=(3, 32, 32))
    m2.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert torch.equal(m.eval()(x), m2.eval()(x))


# ------------------------------------------------------------------------------ the papers' placements, big models

BIG = [
    # arch, placement (the papers' named positions), expected target, channels, spatial at a 64x64 input
    ("torchvision:resnet50", {"res": 4, "before_last": True}, "layer3.5", 1024, (4, 4)),
    ("timm:resnet50", {"res": 4, "before_last": True}, "layer3.5", 1024, (4, 4)),
    ("timm:convnext_tiny", {"res": 4}, "stages.2", 384, (4, 4)),
    ("timm:efficientnet_b0", {"res": 4}, "blocks.4", 112, (4, 4)),
]


@pytest.mark.parametrize("arch,placement,at,channels,spatial", BIG, ids=[b[0] for b in BIG])
def test_big_models_papers_placement(arch, placement, at, channels, spatial):
    x = torch.randn(2, 3, 64, 64)
    m = build_model(arch, 10)
    ref = m.eval()(x)
    insert_blocks(m, [dict(placement, block="nl"), dict(placement, block="snl")], input_shape=(3, 64, 64))
    outer = get_module(m, at)
    assert type(outer).__name__ == "Inserted" and type(outer.module).__name__ == "Inserted"
    for w in (outer, outer.module):
        b = w.nonlocal_block
        assert (b.in_channels, b.dim, w.layout.kind, w.layout.spatial) == (channels, 2, "channels_first", spatial)
    # nl is zero-initialized: with snl's output zeroed too, the model is the backbone again
    with torch.no_grad():
        outer.nonlocal_block.units[0].norm.bn.weight.zero_()
        outer.nonlocal_block.units[0].norm.bn.bias.zero_()
    assert torch.allclose(m.eval()(x), ref, atol=1e-5)
    with torch.no_grad():
        outer.nonlocal_block.units[0].norm.bn.weight.fill_(1.0)  # snl live again: gradients flow through both
    m.train()
    m(x).square().mean().backward()
    for w in (outer, outer.module):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in w.nonlocal_block.parameters())


def test_timm_resnet50_cost_measures_the_backbone(tmp_path):
    from nonlocalnet.analysis import run_cost

    m = build_model("timm:resnet50", 1000)
    insert_blocks(m, {"res": 4, "before_last": True, "block": "nl"})  # dry run at pretrained_cfg 3x224x224
    data = run_cost(Loaded.from_model(m, input_shape=(3, 64, 64)), tmp_path, memory=False)
    assert data["backbone"]["params"] == 25_557_032  # timm resnet50: 25.557 M
    block = inserted_blocks(m)["layer3.5.nonlocal_block"]
    assert data["plus"]["params"] == sum(p.numel() for p in block.parameters()) == data["blocks"][0]["params"]
    assert data["run"]["arch"] == "ResNet" and data["input_shape"] == [3, 64, 64]


# ------------------------------------------------------------------------------------- tokens and channels-last


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_vit_tokens(reg_tokens):
    """A timm ViT's blocks give tokens (B, 1 + R + h*w, C): the block sees (B, C, h, w); class and register
    tokens pass through unchanged."""
    m = build_model("timm:vit_tiny_patch16_224", 10, img_size=64, reg_tokens=reg_tokens)
    insert_blocks(m, {"at": "blocks.5", "block": "snl"})  # dry run at the model's own img_size
    w = get_module(m, "blocks.5")
    prefix = 1 + reg_tokens
    assert (w.layout.kind, w.layout.spatial, w.layout.prefix) == ("tokens", (4, 4), prefix)
    assert (w.nonlocal_block.in_channels, w.nonlocal_block.dim) == (192, 2)
    seen = {}
    w.module.register_forward_hook(lambda mod, a, out: seen.setdefault("tokens", out))
    w.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    t, out = seen["tokens"], seen["out"]
    assert out.shape == t.shape == (2, prefix + 16, 192)
    assert torch.equal(out[:, :prefix], t[:, :prefix])
    grid = t[:, prefix:].transpose(1, 2).reshape(2, 192, 4, 4)  # patch tokens in raster order
    expect = w.nonlocal_block(grid).reshape(2, 192, 16).transpose(1, 2)
    assert torch.allclose(out[:, prefix:], expect, atol=1e-6) and not torch.allclose(expect, t[:, prefix:])


def test_vit_ambiguous_and_wrong_inputs_are_errors():
    m = build_model("timm:vit_tiny_patch16_224", 10, img_size=64)
    with pytest.raises(ValueError, match=r"res4 is ambiguous.*12 modules at reduction 16.*'at'"):
        insert_blocks(m, {"res": 4, "block": "nl"})
    with pytest.raises(ValueError, match=r"dry forward pass .* shape \(2, 3, 32, 32\) \(input_shape\).*"
                                         r"AssertionError.*input_shape="):
        insert_blocks(m, {"at": "blocks.5", "block": "nl"}, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"do not fit grid \[3, 3\].*L=17"):
        insert_blocks(m, {"at": "blocks.5", "block": "nl", "grid": [3, 3], "prefix_tokens": 1})


def test_torchvision_vit_tokens():
    m = build_model("torchvision:vit_b_16", 10, image_size=32)
    insert_blocks(m, {"at": "encoder.layers.encoder_layer_1", "block": "nl"})  # dry run at image_size
    w = get_module(m, "encoder.layers.encoder_layer_1")
    assert (w.layout.kind, w.layout.spatial, w.layout.prefix, w.nonlocal_block.in_channels) == ("tokens", (2, 2), 1,
                                                                                                  768)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(m.eval()(x), strip_blocks(m).eval()(x))  # nl: zero-initialized identity


@pytest.mark.parametrize("arch,at,channels,spatial", [
    ("timm:swin_tiny_patch4_window7_224", {"res": 4}, 384, (4, 4)),
    ("torchvision:swin_t", {"at": "features.3"}, 192, (8, 8)),
], ids=["timm", "torchvision"])
def test_swin_channels_last(arch, at, channels, spatial):
    opts = {"img_size": 64, "window_size": 2} if arch.startswith("timm") else {}
    m = build_model(arch, 10, **opts)
    insert_blocks(m, dict(at, block="snl"), input_shape=(3, 64, 64))
    (path, w), = _blocks(m).items()
    assert (w.layout.kind, w.layout.spatial, w.nonlocal_block.in_channels) == ("channels_last", spatial, channels)
    seen = {}
    w.module.register_forward_hook(lambda mod, a, out: seen.setdefault("in", out))
    w.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        m.eval()(torch.randn(2, 3, 64, 64))
    nhwc = seen["in"]
    assert nhwc.shape == (2, *spatial, channels)
    assert torch.allclose(seen["out"], w.nonlocal_block(nhwc.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------ fx, compile


def test_create_feature_extractor_traces_through_blocks():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    m = build_model("torchvision:resnet50", 10)
    insert_blocks(m, {"res": 4, "before_last": True, "block": "snl"}, input_shape=(3, 64, 64))
    nodes = get_graph_node_names(m)[1]
    assert "layer3.5.nonlocal_block" in nodes  # one leaf node, not its internals
    assert not any(n.startswith("layer3.5.nonlocal_block.") for n in nodes)
    fe = create_feature_extractor(m.eval(), {"layer3.5.nonlocal_block": "nl", "layer3": "res4", "fc": "logits"})
    x = torch.randn(2, 3, 64, 64)
    feats = fe(x)
    assert feats["nl"].shape == (2, 1024, 4, 4) and feats["res4"].shape == (2, 1024, 4, 4)
    assert torch.allclose(feats["logits"], m(x), atol=1e-5)


@pytest.mark.parametrize("arch,placement,opts", [
    # channels-first blocks are compiled in the main suite (test_identities); here the layout conversions
    ("timm:vit_tiny_patch16_224", {"at": "blocks.2", "block": "nl"}, {"img_size": 32, "depth": 3}),
], ids=["vit-tokens"])
def test_compile_fullgraph(arch, placement, opts):
    m = build_model(arch, 10, **opts)
    insert_blocks(m, placement, input_shape=(3, 32, 32))
    _randomize_blocks(m)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, dynamic=False)(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------- train, eval, analyze


def _cli(*args, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "nonlocalnet", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_timm_config_trains_evaluates_and_reports(tmp_path):
    make_cifar10(tmp_path / "data", per_batch=8, test=8)
    pretrained = tmp_path / "resnet18.pt"
    torch.save(build_model("timm:resnet18", 1000).state_dict(), pretrained)  # a local file: nothing downloads
    cfg = {
        "data": {"name": "cifar10", "root": str(tmp_path / "data")},
        "model": {"arch": "timm:resnet18", "pretrained": str(pretrained),
                  "blocks": [{"res": 4, "before_last": True, "block": "nl"}]},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "milestones": [1]},
        "run": {"device": "cpu", "out": str(tmp_path / "run"), "keep_epochs": True},
    }
    (tmp_path / "timm.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("train", str(tmp_path / "timm.yaml"))
    assert r.returncode == 0, r.stderr
    assert "skipped (shape)" in r.stdout + r.stderr  # the 1000-class head of the local file is left out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    r = _cli("eval", str(tmp_path / "run" / "last.safetensors"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == rows[-1]["top1"]
    r = _cli("analyze", "report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--images", "2",
             "--iterations", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report" / "report.html").is_file()
    cost = json.loads((tmp_path / "report" / "cost" / "cost.json").read_text())
    assert cost["run"]["arch"] == "timm:resnet18" and cost["backbone"]["params"] == 11_181_642  # resnet18, 10 classes
    assert [b["block"] for b in cost["blocks"]] == ["layer3.1.nonlocal_block"]
    assert cost["blocks"][0]["input_shape"] == [1, 256, 2, 2]


@pytest.mark.parametrize("arch,options,match", [
    ("timm:resnet_eighteen", {}, "unknown timm model 'resnet_eighteen'"),
    ("torchvision:resnet50", {"weights": "DEFAULT"}, "weights would download weights.*model.pretrained"),
    ("timm:resnet18", {"pretrained": True}, "pretrained would download weights.*model.pretrained"),
])
def test_config_arch_errors(tmp_path, arch, options, match):
    cfg = {"data": {"name": "demo", "size": 16}, "model": {"arch": arch, "options": options},
           "train": {"epochs": 1}, "run": {"device": "cpu", "out": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("train", str(tmp_path / "c.yaml"), timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("nonlocalnet: error: model: ")
    assert __import__("re").search(match, lines[-1]), lines[-1]


def test_swin_layout_per_target():
    """One NHWC model, three targets: the patch projection's conv output is channels-first; a Swin block and a
    stage (feature_info + output_fmt) are channels-last."""
    m = build_model("timm:swin_tiny_patch4_window7_224", 10, img_size=64, window_size=2)
    insert_blocks(m, [{"at": "patch_embed.proj", "block": "nl"}, {"at": "layers.2.blocks.1", "block": "nl"},
                      {"res": 3, "block": "nl"}], input_shape=(3, 64, 64))
    got = {p: (get_module(m, p).layout.kind, get_module(m, p).layout.channels, get_module(m, p).layout.spatial)
           for p in ("patch_embed.proj", "layers.2.blocks.1", "layers.1")}
    assert got == {"patch_embed.proj": ("channels_first", 96, (16, 16)),
                   "layers.2.blocks.1": ("channels_last", 384, (4, 4)),
                   "layers.1": ("channels_last", 192, (8, 8))}
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(m.eval()(x), strip_blocks(m).eval()(x))  # nl: zero-initialized identity in every layout


@pytest.mark.parametrize("arch,opts,at,kind", [
    ("timm:vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "reg_tokens": 2}, "blocks.0", "tokens"),
    ("timm:swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, "layers.1", "channels_last"),
], ids=["vit-tokens", "swin-channels-last"])
def test_every_preset_in_tokens_and_channels_last(arch, opts, at, kind):
    """Every preset at one place (nested, one model): the block sees channels-first features, gradients reach
    each one, the prefix tokens pass through all of them unchanged (the ViT's head reads the class token, so the
    blocks go before its last transformer block: a gradient reaches them only through its attention)."""
    m = build_model(arch, 10, **opts)
    insert_blocks(m, [{"at": at, "block": name} for name in list_blocks()], input_shape=(3, 64, 64))
    wrappers = [w for w in _blocks(m).values()]
    assert len(wrappers) == len(list_blocks())
    assert {w.layout.kind for w in wrappers} == {kind}
    assert [w.nonlocal_block.name for w in wrappers] == list(reversed(list_blocks()))  # the later wraps the earlier
    seen = {}
    inner = wrappers[-1].module  # the original module
    inner.register_forward_hook(lambda mod, a, out: seen.setdefault("in", out))
    wrappers[0].register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    m.train()
    m(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert seen["out"].shape == seen["in"].shape
    if kind == "tokens":
        assert torch.equal(seen["out"][:, :3], seen["in"][:, :3])  # class + 2 register tokens, unchanged
    for w in wrappers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in w.nonlocal_block.parameters()), \
            w.nonlocal_block.name


# ----------------------------------------------- timm model definitions with attn_layer = a nonlocalnet factory


def _nonlocal(model):
    return {n: (b.name, b.in_channels) for n, b in model.named_modules() if isinstance(b, NonlocalBlock)}


@pytest.mark.parametrize("preset", list_blocks())
def test_timm_resnet_definition_with_attn_layer(preset):
    """timm's ResNet builds ``attn_layer(channels, device=, dtype=)`` after each block's last BN (its SE slot)."""
    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10,
               block_args=dict(attn_layer=attn(preset, **SMALL_MAP_OPTIONS.get(preset, {}))))
    assert _nonlocal(m) == {f"layer{i}.0.se": (preset, c) for i, c in zip((1, 2, 3, 4), (64, 128, 256, 512))}
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    if preset in ZERO_INIT and preset != "gc":  # timm re-initializes every Conv2d, GC's zero-initialized last too
        plain = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
        plain.load_state_dict(m.state_dict(), strict=False)
        assert torch.equal(y, plain.eval()(x))
    m.train()
    m(x).square().mean().backward()
    for name in _nonlocal(m):
        params = list(get_module(m, name).parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), name


def test_timm_byobnet_definition_compiles_round_trips_and_trains(tmp_path):
    def net():
        cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="basic", d=1, c=32, s=2, gs=0, br=1.0),
                                  ByoBlockCfg(type="bottle", d=1, c=64, s=2, gs=0, br=0.25)),
                          stem_chs=16, attn_layer=attn("snl", reduction=4))
        return ByobNet(cfg, num_classes=4)

    m = net()
    assert _nonlocal(m) == {"stages.0.0.attn_last": ("snl", 32), "stages.1.0.attn": ("snl", 16)}
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    block = get_module(m, "stages.1.0.attn")
    before = {k: v.clone() for k, v in block.state_dict().items()}
    losses = []
    for _ in range(6):  # a few steps on one batch: the loss falls, the block's weights move
        loss = torch.nn.functional.cross_entropy(m(x), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert any(not torch.equal(before[k], v) for k, v in block.state_dict().items() if v.is_floating_point())
    m.eval()
    torch.save(m.state_dict(), tmp_path / "w.pt")
    m2 = net()
    m2.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(m2.eval()(x), ref)
        out = torch.compile(m, fullgraph=True, dynamic=False)(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_docs_models_md_timm_example():
    run_docs_example("models.md", "timm model definitions")
