"""``nonlocalnet analyze`` on GC and DNL blocks: what applies is computed (and checked against numpy on the
state dict), what does not is said in the JSON. Checkpoints are written directly in the trainer's format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.analysis import load_run, run_affinity, run_attention, run_filter, run_spectrum
from nonlocalnet.runs import build_model_from_config, config_from_dict, dump_config, save_weights

DATA = {"name": "demo", "size": 16, "options": {"train_size": 16, "test_size": 8}}
GC, DNL = "stage1.1.nonlocal_block", "stage2.1.nonlocal_block"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gcdnl")
    raw = {"data": DATA, "model": {"arch": "preresnet20", "blocks": [
        {"stage": 1, "after_block": 2, "block": "gc", "options": {"fusion": "add_mul"}},
        {"stage": 2, "after_block": 2, "block": "dnl", "options": {"temperature": 0.5}}]}}
    cfg = config_from_dict({**raw, "run": {"device": "cpu", "out": str(tmp)}})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, 2, load_pretrained_weights=False)
    with torch.no_grad():  # non-trivial zero-initialized parts
        for name, p in model.named_parameters():
            if "nonlocal_block" in name and ("norm" in name or "conv2" in name):
                p.copy_(torch.randn(p.shape) * 0.5)
    (tmp / "config.yaml").write_text(dump_config(cfg))
    save_weights(tmp / "last.safetensors", model.state_dict(), {"format": "nonlocalnet", "epoch": 0,
                                                                "arch": cfg.model.arch, "config": dump_config(cfg)})
    return load_run(tmp), load_file(str(tmp / "last.safetensors"))


def test_spectrum_says_gc_does_not_apply_and_computes_dnl(run, tmp_path):
    loaded, state = run
    data = run_spectrum(loaded, tmp_path / "s")
    gc, dnl = data["blocks"]
    assert gc["preset"] == "gc" and gc["applies"] is False and gc["matrices"] == []
    assert "bottleneck" in gc["note"] and "not defined" in gc["note"]
    assert dnl["applies"] is True and any("sum graph" in n for n in dnl["notes"])
    (m,) = dnl["matrices"]
    c = loaded.blocks[DNL].in_channels
    wz = state[f"{DNL}.units.0.w.0.weight"].double().numpy().reshape(c, -1)
    wg = state[f"{DNL}.units.0.g.weight"].double().numpy().reshape(-1, c)
    w = wz @ wg
    ev = np.linalg.eigvalsh((w + w.T) / 2)
    ev = ev[np.argsort(-np.abs(ev), kind="stable")][:32]
    np.testing.assert_allclose(m["eigenvalues"], ev, atol=1e-10)
    assert len(data["figures"]) == 1  # DNL only


def test_filter_says_gc_does_not_apply(run, tmp_path):
    loaded, _ = run
    data = run_filter(loaded, tmp_path / "f", images=1)
    gc, dnl = data["blocks"]
    assert gc["applies"] is False and "gain" in gc["note"] and any("rank 1" in n for n in gc["notes"])
    assert dnl["applies"] is True
    hist = dnl["lambda_histogram"]
    assert not hist["source"].startswith("eigh")  # A is not symmetric
    assert hist["max"] == pytest.approx(2.0, abs=1e-6)  # A 1 = 2·1: the sum of two row-stochastic graphs


def test_attention_and_affinity_on_gc_and_dnl(run, tmp_path):
    loaded, _ = run
    att = run_attention(loaded, tmp_path / "a", images=1, top=2)
    gc, dnl = att["blocks"]
    assert any("query-independent" in n for n in gc["notes"])
    rows = [np.asarray(q["row"]) for q in gc["images"][0]["queries"]]
    assert len(rows) == 2 and np.allclose(rows[0], rows[1], atol=1e-8)  # the same a for every query
    assert all(q["row_sum"] == pytest.approx(1.0, abs=1e-6) for q in gc["images"][0]["queries"])
    assert all(q["row_sum"] == pytest.approx(2.0, abs=1e-6) for q in dnl["images"][0]["queries"])
    aff = run_affinity(loaded, tmp_path / "p", images=1, max_power=2, bins=10)
    gc, dnl = aff["blocks"]
    assert gc["stats"]["distance"]["2"]["rel_fro"] == pytest.approx(0.0, abs=1e-9)  # (1aᵀ)² = 1aᵀ
    assert dnl["row_sums"]["min"] == pytest.approx(2.0) and dnl["row_sums"]["max"] == pytest.approx(2.0)
