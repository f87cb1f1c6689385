"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import nonlocalnet


def raises(exc, *fragments):
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in error message: {msg}"
            return out

    return _Ctx()


def test_wrong_rank():
    block = nonlocalnet.build_block("snl", 8)
    with raises(ValueError, "x:", "4-D", "(B, C, H, W)", "(2, 8, 5)"):
        block(torch.randn(2, 8, 5))
    with raises(ValueError, "5-D", "(B, C, T, H, W)"):
        nonlocalnet.build_block("nl", 8, dim=3)(torch.randn(2, 8, 4, 4))


def test_channel_mismatch():
    with raises(ValueError, "expected 8 channels", "got 6"):
        nonlocalnet.build_block("nl", 8)(torch.randn(1, 6, 4, 4))


def test_in_channels_smaller_than_reduction():
    with raises(ValueError, "in_channels (3)", "reduction (4)"):
        nonlocalnet.build_block("snl", 3, reduction=4)
    with raises(ValueError, "in_channels (4)", "reduction (8)"):
        nonlocalnet.build_block("cc", 4)


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(kernel="cosine"), ["kernel", "'cosine'", "embedded_gaussian", "relu_dot"]),
    (dict(backend="flash"), ["backend", "'flash'", "lowrank", "sdpa", "chunked"]),
    (dict(normalization="l2"), ["normalization", "symmetric", "count"]),
    (dict(out_norm="ln"), ["out_norm", "bn_relu", "gamma"]),
    (dict(filter="bessel"), ["filter", "gsnl", "cheby", "cayley", "heat", "wavelet"]),
    (dict(colour=1), ["unknown option", "'colour'", "reduction", "backend"]),
    (dict(groups=2), ["'groups'", "only to cgnl"]),
])
def test_unknown_names_list_valid_ones(kwargs, fragments):
    with raises(ValueError, *fragments):
        nonlocalnet.build_block("snl", 8, **kwargs)


def test_unknown_block():
    with raises(ValueError, "'transformer'", "nl", "snl", "gsnl", "cheby", "a2", "cgnl", "cc"):
        nonlocalnet.build_block("transformer", 8)


@pytest.mark.parametrize("name,kwargs,fragments", [
    ("snl", dict(sub_sample=True), ["symmetric", "sub_sample"]),
    ("nl", dict(kernel="relu_dot", backend="sdpa"), ["sdpa", "exp kernel"]),
    ("nl", dict(backend="lowrank"), ["lowrank", "does not factor"]),
    ("nl", dict(kernel="dot_product", normalization="softmax"), ["softmax", "exp kernels"]),
    ("cheby", dict(order=2, sub_sample=True, normalization="row"), ["sub_sample", "square"]),
    ("snl", dict(order=3), ["order", "cheby"]),
    ("snl", dict(zero_init=True), ["zero_init", "bn_relu"]),
    ("cc", dict(sub_sample=True), ["sub_sample", "criss-cross"]),
    ("cc", dict(normalization="symmetric"), ["normalization", "masked softmax"]),
    ("cc", dict(backend="lowrank"), ["backend", "cc"]),
    ("cgnl", dict(groups=3), ["groups (3)", "divide"]),
    ("cgnl", dict(kernel="concatenation"), ["kernel", "dot_product", "gaussian"]),
    ("nl", dict(units=0), ["units", ">= 1"]),
    ("nl", dict(memory_budget=-1), ["memory_budget"]),
    ("nl", dict(filter="snl", out_proj=False), ["out_proj", "one-term"]),
])
def test_options_that_do_not_go_together(name, kwargs, fragments):
    with raises(ValueError, *fragments):
        nonlocalnet.build_block(name, 8, **kwargs)


def test_bool_options_typed():
    with raises(TypeError, "sub_sample", "bool"):
        nonlocalnet.build_block("nl", 8, sub_sample="yes")


@pytest.mark.parametrize("dim", [0, 4, "2", True])
def test_dim_outside_range(dim):
    with raises(ValueError, "dim", "1, 2 or 3"):
        nonlocalnet.build_block("nl", 8, dim=dim)


def test_spatial_size_zero_and_subsample_too_small():
    block = nonlocalnet.build_block("nl", 8)
    with raises(ValueError, "positive", "(1, 8, 0, 4)"):
        block(torch.randn(1, 8, 0, 4))
    sub = nonlocalnet.build_block("nl", 8, sub_sample=True)
    with raises(ValueError, "too small for sub_sample", "(1, 4)"):
        sub(torch.randn(1, 8, 1, 4))


def test_non_floating_dtype():
    with raises(TypeError, "floating-point", "torch.int64"):
        nonlocalnet.build_block("nl", 8)(torch.ones(1, 8, 4, 4, dtype=torch.long))
    with raises(TypeError, "torch.Tensor"):
        nonlocalnet.build_block("nl", 8)([[1.0]])


def test_cgnl_affinity_explains_graph():
    block = nonlocalnet.build_block("cgnl", 8)
    with raises(ValueError, "positions x channels", "cgnl"):
        block.affinity(torch.randn(1, 8, 4, 4))


def test_no_nan_from_bad_kernel_values():
    """Large logits with the exp kernel under softmax stay finite on every backend."""
    for backend in ("dense", "chunked", "sdpa"):
        block = nonlocalnet.build_block("nl", 8, backend=backend, out_norm="none")
        x = torch.randn(1, 8, 6, 6) * 1e3
        assert torch.isfinite(block(x)).all()
    block = nonlocalnet.build_block("nl", 8, normalization="symmetric", backend="chunked", out_norm="none",
                                    memory_budget=0.001)
    assert torch.isfinite(block(torch.randn(1, 8, 6, 6) * 1e3)).all()
