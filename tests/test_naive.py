"""The naive baselines (bench/naive.py) compute what the block computes, with the block's weights (float64, rtol
1e-6): that is what makes `nonlocalnet bench --baseline naive`'s ratios a comparison of formulations."""

from __future__ import annotations

import json

import pytest
import torch
from _util import assert_close, randomize

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.bench import training_throughput
from nonlocalnet.bench.naive import CASES, naive_forward
from nonlocalnet.cli import main

SHAPES = {1: (2, 16, 7), 2: (2, 16, 6, 5), 3: (2, 16, 3, 4, 4)}


def _block(case: str, dim: int, **extra):
    name, options = CASES[case]
    opts = dict(options, **extra)
    if name == "cc":
        opts.setdefault("reduction", 2)
    return randomize(nonlocalnet.build_block(name, 16, dim=dim, **opts))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_naive_equals_block(case, dim, training):
    if CASES[case][0] == "cc" and dim != 2:
        pytest.skip("CCNet's naive form is 2-D")
    block = _block(case, dim)
    block.train(training)
    x = torch.randn(SHAPES[dim], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_close(naive_forward(block, x), block(x))


@pytest.mark.parametrize("case", list(CASES))
def test_naive_equals_block_channels_last(case):
    block = _block(case, 2)
    x = torch.randn(SHAPES[2], dtype=torch.float64).to(memory_format=torch.channels_last)
    y = block(x)
    assert_close(naive_forward(block, x), y)
    assert_close(y, block(x.contiguous()))


@pytest.mark.parametrize("extra", [{"units": 2}, {"kernel": "gaussian", "taylor_order": 2, "rbf_gamma": 0.1},
                                   {"kernel": "gaussian", "rbf_prefactor": "constant", "rbf_gamma": 0.1},
                                   {"normalization": "count", "scale": True}])
def test_naive_variants(extra):
    name = "snl" if "units" in extra else "cgnl"
    block = randomize(nonlocalnet.build_block(name, 16, dim=2, **extra))
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    assert_close(naive_forward(block, x), block(x))


def test_naive_rejects_what_it_does_not_cover():
    block = nonlocalnet.build_block("cc", 16, dim=1, reduction=2)
    with pytest.raises(ValueError, match="2-D"):
        naive_forward(block, torch.randn(1, 16, 5))
    for name in ("cayley", "heat", "wavelet"):
        with pytest.raises(ValueError, match="spectral"):
            naive_forward(nonlocalnet.build_block(name, 16, dim=2), torch.randn(1, 16, 4, 4))


def test_bench_naive_smoke(tmp_path, capfd):
    out = tmp_path / "naive.json"
    assert main(["bench", "--baseline", "naive", "--cases", "nl", "cgnl", "--blocks", "cc", "--sizes", "8",
                 "--threads", "1", "--repeats", "1", "--modes", "fwd+bwd", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["nl", "cgnl", "cc"]
    assert all(r["ratio"] > 0 and r["threads"] == 1 for r in rows)
    assert "naive/ours" in capfd.readouterr().out


@pytest.mark.parametrize("opts", [{"kernel": "gaussian"}, {"value_channels": 12}, {"key_channels": 3}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sdpa_unequal_widths_match_reference(opts, channels_last):
    """SDPA pads q/k or v with zero channels to one width (the fused kernel's condition): still exact."""
    block = randomize(nonlocalnet.build_block("nl", 16, dim=2, backend="sdpa", **opts))
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64) * 0.3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_close(block(x), ref.forward(block, x.contiguous()))


@pytest.mark.parametrize("name", ["cc", "cgnl", "snl", "gc"])
def test_channels_last_output_keeps_its_layout(name):
    block = nonlocalnet.build_block(name, 16, dim=2, **({"reduction": 2} if name == "cc" else {}))
    x = torch.randn(2, 16, 6, 5).to(memory_format=torch.channels_last)
    assert block(x).is_contiguous(memory_format=torch.channels_last)
    assert block(x.contiguous()).is_contiguous()


def test_training_throughput_smoke():
    rows = training_throughput(["snl"], batch=2, size=8, steps=1, threads=1)
    assert rows[0]["auto_img_s"] > 0 and rows[0]["auto_vs_naive"] > 0


def test_merge_naive_takes_medians_and_range():
    from nonlocalnet.bench import format_naive, merge_naive

    def row(ratio, naive_ms, ours_ms, note=""):
        return {"case": "a2", "block": "a2", "shape": "2x8x4x4", "mode": "fwd", "threads": 1, "path": "lowrank",
                "naive_ms": naive_ms, "ours_ms": ours_ms, "ratio": ratio, "note": note}

    (m,) = merge_naive([[row(1.0, 2.0, 2.0)], [row(2.0, 4.0, 2.0)], [row(1.5, 3.0, 2.0)]])
    assert (m.ratio, m.ratio_lo, m.ratio_hi, m.naive_ms, m.ours_ms, m.note) == (1.5, 1.0, 2.0, 3.0, 2.0, "")
    assert "1.50 [1.00-2.00]" in format_naive([m])
    (m,) = merge_naive([[row(1.0, 2.0, 2.0)], [row(None, None, None, "failed: x")]])
    assert m.ratio == 1.0 and m.note == "1 of 2 processes failed"
    (m,) = merge_naive([[row(None, None, None, "skipped: big")]])
    assert m.ratio is None and m.note == "skipped: big"
