"""Property-based tests (hypothesis): any combination of block options, input shapes and dtypes either
raises ValueError/TypeError naming an argument, or gives a finite output of the input's shape — never an
internal error; any config override either raises ConfigError naming the key or gives a valid config."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nonlocalnet
from nonlocalnet.kernels import BACKENDS, KERNELS, NORMALIZATIONS
from nonlocalnet.runs import Config, ConfigError, load_config

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_numbers = st.one_of(st.integers(-2, 4), st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([0, 0.5, 1e-4, float("nan"), float("inf")]))
OPTIONS = {
    "reduction": st.one_of(st.integers(-1, 5), st.just(1.5)),
    "kernel": st.sampled_from([*KERNELS, "cosine"]),
    "normalization": st.sampled_from([*NORMALIZATIONS, "l2"]),
    "backend": st.sampled_from([*BACKENDS, "flash"]),
    "scale": st.one_of(st.booleans(), _numbers, st.just("big")),
    "sub_sample": st.one_of(st.booleans(), st.just("yes")),
    "units": st.integers(-1, 3),
    "memory_budget": st.one_of(_numbers, st.just(0.001)),
    "norm_groups": st.one_of(st.none(), st.integers(-1, 4), st.just(1.5)),
    "zero_init": st.booleans(),
    "out_norm": st.sampled_from(["none", "bn", "bn_relu", "gn", "gamma", "ln"]),
    "order": st.one_of(st.none(), st.integers(-1, 4)),
    "value_channels": st.one_of(st.none(), st.integers(-1, 9)),
}
SHAPES = {1: [(2, 8, 5), (1, 8, 1)], 2: [(2, 8, 4, 5), (1, 8, 1, 1), (1, 8, 2, 3)], 3: [(1, 8, 2, 3, 4)]}


@st.composite
def block_case(draw):
    name = draw(st.sampled_from(nonlocalnet.list_blocks()))
    keys = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True))
    options = {k: draw(OPTIONS[k]) for k in keys}
    dim = draw(st.sampled_from([1, 2, 3]))
    shape = draw(st.sampled_from(SHAPES[dim] + [(1, 8, 3)]))  # sometimes the wrong rank
    block_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float32]))
    return name, options, dim, shape, block_dtype, x_dtype


@FEW
@given(block_case())
def test_build_block_fails_clearly_or_works(case):
    name, options, dim, shape, block_dtype, x_dtype = case
    named = [*options, "in_channels", "dim", "name", "reduction", "kernel", "normalization", "backend"]
    try:
        block = nonlocalnet.build_block(name, 8, dim=dim, **options).to(block_dtype)
    except (ValueError, TypeError) as e:
        assert any(k in str(e) for k in named), f"{type(e).__name__} names no argument: {e}"
        return
    x = torch.randn(shape, dtype=x_dtype)
    try:
        y = block(x)
    except (ValueError, TypeError) as e:
        assert str(e).startswith("x:"), f"input error does not name x: {e}"
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, width=32),
                    st.text(max_size=6), st.lists(st.integers(0, 5), max_size=3))
_keys = st.sampled_from(["train.lr", "train.momentum", "train.epochs", "train.batch_size", "train.gamma",
                         "train.warmup_epochs", "train.clip_grad_norm", "train.eval_batch_size", "train.amp",
                         "train.schedule", "train.milestones", "train.nonfinite", "data.name", "data.size",
                         "run.log_every", "model.arch", "model.blocks", "model.blocks.0.units",
                         "model.blocks.0.stage", "model.blocks.0.where", "train.lrr"])


@FEW
@given(st.lists(st.tuples(_keys, _values), max_size=3))
def test_config_overrides_fail_clearly_or_validate(pairs):
    import yaml

    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    base = ["model.blocks=[{stage: 1, after_block: 2, block: snl}]"]
    try:
        cfg = load_config(None, base + overrides)
    except ConfigError as e:
        msg = str(e)
        assert any(k.split(".")[-1] in msg or k.split(".")[0] in msg for k, _ in pairs) or "override" in msg, msg
        return
    assert isinstance(cfg, Config)
    t = cfg.train
    assert math.isfinite(t.lr) and t.lr > 0 and 0 <= t.momentum < 1 and t.epochs >= 1 and t.gamma > 0
