"""``bench --baseline peers``: each public module's weights mapped into our block, the pair equal in float64
(the check that gates the timing), a disagreeing pair refused; the CLI's one-line error without the packages.

The pair tests are marked ``interop`` (they need timm / mmcv-lite + mmengine: ``.venv-vision``); the CLI error
tests run in the main environment. No timing is asserted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

from nonlocalnet.bench import peers
from nonlocalnet.cli import EXIT_ERROR, main

# The preset and its defining options each peer must convert to (the converter chose the block, not the bench).
EXPECTED = {"nl/timm": ("nl", "embedded_gaussian"), "nl/mmcv": ("nl", "embedded_gaussian"),
            "nl-dot/mmcv": ("nl", "dot_product"), "nl-gauss/mmcv": ("nl", "gaussian"),
            "cc/mmcv": ("cc", "embedded_gaussian"), "cc-r2/mmcv": ("cc", "embedded_gaussian"),
            "gc/mmcv": ("gc", "unary"), "gc/timm": ("gc", "unary"), "nl3d/mmcv": ("nl", "embedded_gaussian"),
            "dnl/mmseg": ("dnl", "embedded_gaussian")}
# float64 agreement asked here: mmseg's DNL divides its logits by sqrt(C_s) and τ held as float32 tensors
# (`torch.tensor(..., dtype=torch.float)`), so even in float64 it is off by float32's rounding of those constants
TOLERANCE = {"dnl/mmseg": 1e-7}


def _have(name: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in peers.PEERS[name].needs)


@pytest.mark.interop
@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_maps_into_our_block_and_agrees_in_float64(name):
    if not _have(name):
        pytest.skip(f"{peers.PEERS[name].package} not installed")
    peer, ours = peers.build_pair(name, 16)
    assert ours.name == EXPECTED[name][0]
    if EXPECTED[name][1]:
        assert ours.edges.kernel == EXPECTED[name][1]
    shape = peers.check_shape(name, 16)
    assert len(shape) == 2 + peers.PEERS[name].dim
    err = peers.check_pair(name, peer, ours, shape)
    assert err <= TOLERANCE.get(name, 1e-9), err
    # the random weights make the block do something: its output is not the input (inits zero the output maps)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = ours.double().eval()(x)
    assert float((y - x).abs().max()) > 1e-2


@pytest.mark.interop
def test_mmcv_criss_cross_is_mmcvs_own_module():
    if not _have("cc/mmcv"):
        pytest.skip("mmcv not installed")
    cls = peers.mmcv_criss_cross_class()
    assert cls.__name__ == "CrissCrossAttention"
    assert cls.__module__ in ("mmcv.ops.cc_attention", "nonlocalnet_peer_mmcv_cc_attention")
    assert peers.mmcv_criss_cross_class() is cls  # loaded once
    package = Path(importlib.util.find_spec("mmcv").origin).parent
    assert Path(inspect.getsourcefile(cls)) == package / "ops" / "cc_attention.py"  # mmcv's own file, not a copy


@pytest.mark.interop
def test_mmseg_dnl_is_mmsegs_own_module():
    if not _have("dnl/mmseg"):
        pytest.skip("mmsegmentation not installed")
    cls = peers.mmseg_dnl_class()
    assert cls.__name__ == "DisentangledNonLocal2d" and peers.mmseg_dnl_class() is cls
    package = Path(importlib.util.find_spec("mmseg").origin).parent
    assert Path(inspect.getsourcefile(cls)) == package / "models" / "decode_heads" / "dnl_head.py"
    assert getattr(sys.modules.get("mmseg"), "__path__", None) != []  # the stub package it was given is gone again


@pytest.mark.interop
def test_a_3d_peer_is_timed_on_clips():
    if not _have("nl3d/mmcv"):
        pytest.skip("mmcv not installed")
    assert peers.peer_shapes("nl3d/mmcv", 2, 16, [32], [(4, 6, 6)]) == [(2, 16, 4, 6, 6)]
    assert peers.peer_shapes("nl/mmcv", 2, 16, [32], [(4, 6, 6)]) == [(2, 16, 32, 32)]
    row = peers.run_peer_case("nl3d/mmcv", (2, 16, 4, 6, 6), "fwd", 1, repeats=1, memory=False)
    assert row.note == "" and row.max_rel_err <= 1e-9 and row.shape == "2x16x4x6x6" and row.ratio > 0


@pytest.mark.interop
def test_a_disagreeing_pair_is_refused_not_timed(monkeypatch):
    name = "gc/timm" if _have("gc/timm") else "gc/mmcv"
    if not _have(name):
        pytest.skip("neither timm nor mmcv installed")
    good = peers.PEERS[name].convert

    def off_by_a_bit(m):
        block = good(m)
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.01)
        return block
    monkeypatch.setitem(peers.PEERS, name, dataclasses.replace(peers.PEERS[name], convert=off_by_a_bit))
    row = peers.run_peer_case(name, (2, 16, 8, 8), "fwd", 1, repeats=1, memory=False)
    assert row.note.startswith("refused: outputs differ in float64")
    assert row.max_rel_err > 1e-4
    assert row.peer_ms is None and row.ours_ms is None and row.ratio is None


@pytest.mark.interop
def test_a_cell_is_filled(monkeypatch):
    name = "gc/timm" if _have("gc/timm") else "gc/mmcv"
    if not _have(name):
        pytest.skip("neither timm nor mmcv installed")
    row = peers.run_peer_case(name, (2, 16, 8, 8), "fwd+bwd", 1, repeats=1, memory=True)
    assert row.note == "" and row.max_rel_err <= 1e-9
    assert row.peer_ms > 0 and row.ours_ms > 0 and row.ratio == pytest.approx(row.peer_ms / row.ours_ms)
    assert row.peer_mib > 0 and row.ours_mib > 0


def test_cli_error_when_no_peer_package(monkeypatch, capsys):
    gone = {k: dataclasses.replace(p, needs=("nonlocalnet_no_such_module",)) for k, p in peers.PEERS.items()}
    monkeypatch.setattr(peers, "PEERS", gone)
    assert main(["bench", "--baseline", "peers"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nonlocalnet: error: bench --baseline peers: no peer package")
    assert main(["bench", "--baseline", "peers", "--peers", "gc/timm"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gc/timm: timm is not installed" in err[0]


def test_cli_error_in_this_environment(capsys):
    if any(_have(k) for k in peers.PEERS):
        pytest.skip("a peer package is installed here (the vision environment)")
    assert main(["bench", "--baseline", "peers"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nonlocalnet: error: ") and "pip install" in err[0]


@pytest.mark.interop
def test_compiled_columns_are_measured_in_the_same_rounds():
    name = "gc/timm" if _have("gc/timm") else "gc/mmcv"
    if not _have(name):
        pytest.skip("neither timm nor mmcv installed")
    row = peers.run_peer_case(name, (2, 16, 8, 8), "fwd", 1, repeats=1, memory=False, compiled=True)
    assert row.note == "" and row.peer_compiled_ms > 0 and row.ours_compiled_ms > 0
    assert row.ratio_compiled == pytest.approx(row.peer_compiled_ms / row.ours_compiled_ms)
    text = peers.format_peers([row])
    assert "ours c ms" in text.splitlines()[0] and f"{row.ratio_compiled:.2f}" in text.splitlines()[2]
