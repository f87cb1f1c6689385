"""nonlocalnet blocks from OpenMMLab configs: mmengine's MODELS registry, ``build_from_cfg``, a config file with
``custom_imports``, mmcv's ``build_plugin_layer`` and a ResNet that builds its plugins the way mmdet's does.

Marked ``interop`` (``make test-interop``, where mmengine and mmcv-lite are installed); skipped without mmengine.
mmdet itself is not installed: its models import mmcv's compiled ops (``mmcv.ops``), which mmcv-lite does not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _util import run_docs_example
from torch import nn

from nonlocalnet import NonlocalBlock, build_block, list_blocks

pytestmark = pytest.mark.interop
mmengine = pytest.importorskip("mmengine")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, build_from_cfg  # noqa: E402

from nonlocalnet.integrations.openmmlab import ENTRIES, registry_name  # noqa: E402

try:
    from mmcv.cnn import build_plugin_layer
except ImportError:  # no mmcv(-lite): the same lookup through mmengine's MODELS
    build_plugin_layer = None

ROOT = Path(__file__).resolve().parents[1]


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.mark.parametrize("preset", list_blocks())
def test_every_preset_builds_from_the_registry(preset):
    assert MODELS.get(registry_name(preset)) is ENTRIES[preset.upper()]
    block = build_from_cfg(dict(type=registry_name(preset), in_channels=16), MODELS)
    ref = build_block(preset, 16)
    assert isinstance(block, NonlocalBlock) and (block.name, block.in_channels) == (preset, 16)
    _randomize(block)
    ref.load_state_dict(block.state_dict())  # same state dict as build_block's: checkpoints interchangeable
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(block.eval()(x), ref.eval()(x))


def test_block_by_name_and_options():
    b = MODELS.build(dict(type="nonlocalnet.Block", name="dnl", in_channels=32, reduction=4, temperature=0.1))
    assert (b.name, b.units[0].g.weight.shape[0]) == ("dnl", 8)
    v = MODELS.build(dict(type="nonlocalnet.NL", in_channels=8, dim=3))  # video (mmaction2)
    assert v(torch.randn(1, 8, 2, 3, 3)).shape == (1, 8, 2, 3, 3)
    with pytest.raises(Exception, match="redution"):
        MODELS.build(dict(type="nonlocalnet.SNL", in_channels=16, redution=4))
    with pytest.raises(Exception, match="in_channels"):
        MODELS.build(dict(type="nonlocalnet.SNL"))


@pytest.mark.skipif(build_plugin_layer is None, reason="mmcv(-lite) not installed")
def test_mmcv_build_plugin_layer():
    name, layer = build_plugin_layer(dict(type="nonlocalnet.SNL", reduction=4), in_channels=64, postfix=2)
    assert name == "nonlocalnet_snl2" and isinstance(layer, NonlocalBlock) and layer.in_channels == 64
    name, layer = build_plugin_layer(dict(type="nonlocalnet.Block", name="gc"), in_channels=64)
    assert name == "nonlocalnet" and layer.name == "gc"


# ------------------------------------------------------------ a ResNet that takes plugins the way mmdet's does


def _plugin_layer(cfg, in_channels, postfix):
    if build_plugin_layer is not None:
        return build_plugin_layer(cfg, in_channels=in_channels, postfix=postfix)
    cfg = dict(cfg)
    cls = MODELS.get(cfg["type"])
    return f"{cls._abbr_}{postfix}", MODELS.build({**cfg, "in_channels": in_channels})


class _Bottleneck(nn.Module):
    """mmdet's Bottleneck, reduced to what matters here: plugins ``after_conv1`` / ``after_conv2`` (``planes``
    channels) and ``after_conv3`` (``planes * 4``), each built by ``build_plugin_layer(cfg, in_channels=...,
    postfix=...)`` and applied in order (mmdet.models.backbones.resnet: make_block_plugins, forward_plugin)."""

    def __init__(self, inplanes, planes, stride, plugins):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.names = {}
        for pos, ch in (("after_conv1", planes), ("after_conv2", planes), ("after_conv3", out)):
            self.names[pos] = []
            for p in (p for p in plugins if p["position"] == pos):
                p = dict(p["cfg"])
                name, layer = _plugin_layer(p, ch, p.pop("postfix", ""))
                assert not hasattr(self, name), f"duplicate plugin {name}"
                self.add_module(name, layer)
                self.names[pos].append(name)

    def _plugins(self, x, pos):
        for name in self.names[pos]:
            x = getattr(self, name)(x)
        return x

    def forward(self, x):
        y = self._plugins(torch.relu(self.bn1(self.conv1(x))), "after_conv1")
        y = self._plugins(torch.relu(self.bn2(self.conv2(y))), "after_conv2")
        y = self._plugins(self.bn3(self.conv3(y)), "after_conv3")
        return torch.relu(y + self.down(x))


@MODELS.register_module(force=True)
class PluginResNet(nn.Module):
    """Four stages of one bottleneck each; ``plugins`` as in mmdet's ResNet (``stages`` selects the stages:
    make_stage_plugins)."""

    def __init__(self, plugins=None, base=8, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU())
        layers, inplanes = [], base
        for i in range(4):
            stage = [dict(p) for p in plugins or () if p.get("stages") is None or p["stages"][i]]
            layers.append(_Bottleneck(inplanes, base * 2**i, 1 if i == 0 else 2, stage))
            inplanes = base * 2**i * 4
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


CONFIG = '''
custom_imports = dict(imports=["nonlocalnet.integrations.openmmlab"], allow_failed_imports=False)
model = dict(type="PluginResNet", plugins=[
    dict(cfg=dict(type="nonlocalnet.SNL", reduction=4), stages=(False, False, True, False), position="after_conv2"),
    dict(cfg=dict(type="nonlocalnet.Block", name="nl", postfix="_c3"), stages=(False, False, False, True),
         position="after_conv3"),
])
'''


def test_mmengine_config_builds_and_trains_a_resnet_with_plugins(tmp_path):
    path = tmp_path / "resnet_nonlocal.py"
    path.write_text(CONFIG)
    cfg = Config.fromfile(path)  # imports custom_imports: the registration
    model = MODELS.build(cfg.model)
    blocks = {n: (m.name, m.in_channels) for n, m in model.named_modules() if isinstance(m, NonlocalBlock)}
    assert blocks == {"layers.2.nonlocalnet_snl": ("snl", 32), "layers.3.nonlocalnet_c3": ("nl", 256)}
    x, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    # NL's output is zero-initialized: at init the model equals the one with the SNL plugin alone; SNL's output
    # is not (authors' code), so that one differs from the plugin-free ResNet
    plain = MODELS.build(dict(type="PluginResNet"))
    snl_only = MODELS.build(dict(type="PluginResNet", plugins=cfg.model.plugins[:1]))
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys and missing.unexpected_keys
    assert all(re.match(r"layers\.[23]\.nonlocalnet", k) for k in missing.unexpected_keys)
    snl_only.load_state_dict(model.state_dict(), strict=False)
    model.eval(), plain.eval(), snl_only.eval()
    with torch.no_grad():
        assert torch.equal(model(x), snl_only(x)) and not torch.equal(model(x), plain(x))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {k: v.clone() for k, v in model.layers[2].nonlocalnet_snl.state_dict().items()}
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grads = [p.grad for p in model.layers[2].nonlocalnet_snl.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    opt.step()
    after = model.layers[2].nonlocalnet_snl.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


def test_docs_models_md_openmmlab_example():
    run_docs_example("models.md", "OpenMMLab")
