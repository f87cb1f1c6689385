"""nonlocalnet.integrations without the frameworks: timm's attention-layer factory (timm itself is not needed to
build one) and the OpenMMLab module's error without mmengine. Inside real timm / mmengine models:
tests/test_interop.py and tests/test_openmmlab.py (``make test-interop``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys

import pytest
import torch

from nonlocalnet import build_block, list_blocks
from nonlocalnet.integrations.timm import attn


@pytest.mark.parametrize("preset", list_blocks())
def test_timm_factory_builds_the_preset(preset):
    layer = attn(preset)(32)  # timm: create_attn(attn_layer, channels) -> attn_layer(channels)
    ref = build_block(preset, 32)
    assert type(layer) is type(ref) and (layer.name, layer.in_channels, layer.dim) == (preset, 32, 2)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32, 6, 6)
    assert torch.equal(layer.eval()(x), ref.eval()(x))


def test_timm_factory_options_kwargs_device_dtype():
    f = attn("snl", reduction=4)
    assert f(64).units[0].g.weight.shape == (16, 64, 1, 1)
    assert f(64, reduction=8).units[0].g.weight.shape == (8, 64, 1, 1)  # timm's attn_kwargs override
    d = f(64, device="meta", dtype=torch.float64)  # timm passes device= / dtype= (meta-device init)
    assert {(p.device.type, p.dtype) for p in d.parameters()} == {("meta", torch.float64)}
    assert attn("cheby", order=3)(16).units[0].w.__len__() == 4
    assert repr(attn("nl", sub_sample=True)) == "attn('nl', sub_sample=True)"
    g = pickle.loads(pickle.dumps(f))  # a model config holding the factory can be copied and saved
    assert (g.name, g.options) == ("snl", {"reduction": 4})


def test_timm_factory_errors():
    with pytest.raises(ValueError, match=r"attn: unknown block 'snl2'; valid: nl, ns, snl"):
        attn("snl2")
    with pytest.raises((ValueError, TypeError), match="redution"):
        attn("snl", redution=4)(64)


def test_openmmlab_without_mmengine_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)
    monkeypatch.setitem(sys.modules, "mmengine.registry", None)
    monkeypatch.delitem(sys.modules, "nonlocalnet.integrations.openmmlab", raising=False)
    with pytest.raises(ImportError, match=r"needs mmengine \(the optional extra 'openmmlab'\): pip install "
                                          r"'nonlocalnet\[openmmlab\]'"):
        importlib.import_module("nonlocalnet.integrations.openmmlab")


@pytest.mark.interop
@pytest.mark.parametrize("module", ["torchvision", "timm", "mmengine", "mmcv.cnn"])
def test_ci_interop_env_has_every_framework(module):
    """CI (.ci/run sets CI) builds the interop env with torchvision, timm, mmengine and mmcv-lite (Makefile,
    vision-venv), so tests/test_interop.py and tests/test_openmmlab.py (mmcv's ``build_plugin_layer`` included) run
    there: a missing framework fails in CI instead of skipping those modules. Elsewhere it skips."""
    if not os.environ.get("CI") and importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} not installed and CI is unset")
    mod = importlib.import_module(module)
    if module == "mmcv.cnn":
        assert callable(mod.build_plugin_layer) and hasattr(mod, "ContextBlock")
