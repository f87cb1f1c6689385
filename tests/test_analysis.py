"""``nonlocalnet analyze``: every number against an independent computation (numpy on the state-dict tensors
read by key, numpy matrix powers, hand FLOP counts), the error messages, and the HTML report rendered in a real
browser (headless Chromium). One tiny training run (PreResNet-20 + a 2-unit SNL stage on 16x16 demo images)
is shared; other checkpoints are written directly in the trainer's format."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from nonlocalnet.analysis import (
    load_run,
    run_affinity,
    run_attention,
    run_cost,
    run_dynamics,
    run_filter,
    run_spectrum,
    write_report,
)
from nonlocalnet.cli import main as cli_main
from nonlocalnet.models import get_module
from nonlocalnet.profiling import count_flops
from nonlocalnet.runs import build_model_from_config, config_from_dict, dump_config, save_weights
from nonlocalnet.train import train

TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 64, "test_size": 32}},
    "model": {"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl", "units": 2}]},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "milestones": [2], "max_steps_per_epoch": 2},
    "run": {"device": "cpu", "progress": False},
}
BLOCK = "stage1.1.nonlocal_block"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "run"
    cfg = config_from_dict({**TINY, "run": {**TINY["run"], "out": str(out)}})
    train(cfg)
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


def _checkpoint(tmp: Path, raw: dict, num_classes: int = 2, seed: int = 0) -> Path:
    """A run dir in the trainer's format (config.yaml + last.safetensors with config metadata), no training."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict({**raw, "run": {"device": "cpu", "out": str(tmp)}})
    torch.manual_seed(seed)
    model = build_model_from_config(cfg, num_classes, load_pretrained_weights=False)
    with torch.no_grad():  # non-trivial output norms (zero-init BN / gamma would hide the blocks)
        for name, p in model.named_parameters():
            if "nonlocal_block" in name and ("norm" in name):
                p.copy_(torch.randn(p.shape) * 0.5)
    (tmp / "config.yaml").write_text(dump_config(cfg))
    save_weights(tmp / "last.safetensors", model.state_dict(), {"format": "nonlocalnet", "epoch": 0,
                                                                "arch": cfg.model.arch, "config": dump_config(cfg)})
    return tmp


def _sorted_mag(v: np.ndarray) -> np.ndarray:
    return v[np.argsort(-np.abs(v), kind="stable")]


def _png_ok(path: str | Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150
        a = np.asarray(im.convert("L"), dtype=float)
    assert a.std() > 5, f"{path} looks blank"


def _snl_affinity(state: dict, x: np.ndarray) -> np.ndarray:
    """SNL's A (relu-dot kernel, symmetric normalization) in numpy from the state dict: (B, C, H, W) -> (B, N, N)."""
    (edges,) = {k.rsplit(".", 2)[0] for k in state if k.startswith(BLOCK) and k.endswith(".theta.weight")}
    wt = state[f"{edges}.theta.weight"].double().numpy().reshape(-1, x.shape[1])
    wp = state[f"{edges}.phi.weight"].double().numpy().reshape(-1, x.shape[1])
    tok = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)  # (B, N, C)
    out = []
    for t in tok:
        th, ph = np.maximum(t @ wt.T, 0), np.maximum(t @ wp.T, 0)
        m = th @ ph.T
        m = 0.5 * (m + m.T)
        d = m.sum(1)
        dm = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
        out.append(dm[:, None] * m * dm[None, :])
    return np.stack(out)


def _block_input(loaded, images: torch.Tensor) -> np.ndarray:
    """The block's input recorded independently: the output of the module the block was inserted after."""
    from nonlocalnet.data import build_dataset

    ds = build_dataset("demo", None, "test", size=16, train_size=64, test_size=32)
    x = ds.batch_transform(False)(images)
    seen = {}
    wrapped = get_module(loaded.model, "stage1.1").module
    h = wrapped.register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach().clone()))
    with torch.no_grad():
        loaded.model(x)
    h.remove()
    return seen["x"].double().numpy()


# --------------------------------------------------------------------------------------------- spectrum


def test_spectrum_matches_numpy_on_state_dict(loaded, run_dir, tmp_path):
    data = run_spectrum(loaded, tmp_path / "s", top=32)
    state = load_file(str(run_dir / "last.safetensors"))
    (blk,) = data["blocks"]
    assert blk["block"] == BLOCK and blk["preset"] == "snl" and len(blk["matrices"]) == 4  # 2 units x 2 terms
    for m in blk["matrices"]:
        wg = state[m["g_key"]].double().numpy().reshape(8, 16)  # C_v x C
        wz = state[m["w_key"]].double().numpy().reshape(16, 8)  # C x C_v
        w = wz @ wg
        ref = _sorted_mag(np.linalg.eigvalsh((w + w.T) / 2))
        assert m["w_key"] == f"{BLOCK}.units.{m['unit']}.w.{m['term']}.weight"
        assert m["num_eigenvalues"] == 16 and len(m["eigenvalues"]) == 16  # C = 16 < 32
        np.testing.assert_allclose(m["eigenvalues"], ref, rtol=0, atol=1e-10)
        assert abs(m["eigenvalues"][0]) >= abs(m["eigenvalues"][-1])
    assert [m["filter_term"] for m in blk["matrices"][:2]] == ["I", "A"]
    # evolution: one row per epoch checkpoint, each equal to that epoch's own eigenvalues
    evo = data["evolution"]
    assert evo["epochs"] == [1, 2, 3]
    s0 = evo["blocks"][BLOCK]["series"][0]
    st1 = load_file(str(run_dir / "epoch_0001.safetensors"))
    w = st1[s0["w_key"]].double().numpy().reshape(16, 8) @ st1[s0["g_key"]].double().numpy().reshape(8, 16)
    np.testing.assert_allclose(s0["eigenvalues"][0], _sorted_mag(np.linalg.eigvalsh((w + w.T) / 2)), atol=1e-10)
    on_disk = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    assert on_disk["blocks"][0]["matrices"][0]["eigenvalues"] == pytest.approx(blk["matrices"][0]["eigenvalues"])
    assert len(data["figures"]) == 2
    for f in data["figures"]:
        _png_ok(f)


def test_spectrum_grouped_and_without_out_proj(tmp_path):
    raw = {"data": TINY["data"], "model": {"arch": "preresnet20", "blocks": [
        {"stage": 1, "after_block": 2, "block": "cgnl", "options": {"groups": 2}},
        {"stage": 2, "after_block": 2, "block": "cc"}]}}
    run = _checkpoint(tmp_path / "gc", raw)
    loaded = load_run(run)
    data = run_spectrum(loaded, tmp_path / "out", top=32)
    state = load_file(str(run / "last.safetensors"))
    cg, cc = data["blocks"]
    assert cg["preset"] == "cgnl" and cc["preset"] == "cc"
    (m,) = cg["matrices"]
    assert m["groups"] == 2 and "block-diagonal" in m["note"]
    # the dense W_z of the grouped conv, found by applying the conv to the identity (independent of the code)
    conv = loaded.blocks["stage1.1.nonlocal_block"].units[0].w[0]
    with torch.no_grad():
        wz = conv(torch.eye(8).reshape(8, 8, 1, 1)).reshape(8, 16).T.double().numpy()  # C x C_v
    assert np.count_nonzero(wz[:8, 4:]) == 0 and np.count_nonzero(wz[8:, :4]) == 0
    w = wz @ state[m["g_key"]].double().numpy().reshape(8, 16)
    np.testing.assert_allclose(m["eigenvalues"], _sorted_mag(np.linalg.eigvalsh((w + w.T) / 2)), atol=1e-10)
    # CC: out_proj=False -> no W_z; W = W_g (C x C), said in the JSON
    (m,) = cc["matrices"]
    assert m["w_key"] is None and "out_proj=False" in m["note"] and m["product"] == "W_g"
    wg = state[m["g_key"]].double().numpy().reshape(32, 32)
    np.testing.assert_allclose(m["eigenvalues"], _sorted_mag(np.linalg.eigvalsh((wg + wg.T) / 2)), atol=1e-10)
    gamma = float(state["stage2.1.nonlocal_block.units.0.norm.gamma"])
    np.testing.assert_allclose(m["folded"]["eigenvalues"], gamma * np.asarray(m["eigenvalues"]), atol=1e-10)
    assert data["evolution"] is None and any("epoch" in n for n in data["notes"])
    for f in data["figures"]:
        _png_ok(f)


# --------------------------------------------------------------------------------------------- affinity


def test_affinity_histograms_match_numpy_matrix_powers(loaded, tmp_path):
    data = run_affinity(loaded, tmp_path / "a", images=4, bins=40)
    assert data["data"]["dataset"] == "demo" and data["data"]["samples"] == 4
    (blk,) = data["blocks"]
    st = blk["stats"]
    assert blk["n"] == blk["n_keys"] == 256 and blk["symmetric"] and st["powers"] == [1, 2, 3, 4]
    from nonlocalnet.data import build_dataset

    images = build_dataset("demo", None, "test", size=16, train_size=64, test_size=32).images[:4]
    a = _snl_affinity(loaded.state, _block_input(loaded, images))
    edges = np.asarray(st["bin_edges"])
    lo = min(np.linalg.matrix_power(m, k).min() for m in a for k in range(1, 5))
    hi = max(np.linalg.matrix_power(m, k).max() for m in a for k in range(1, 5))
    assert edges[0] == pytest.approx(lo, rel=1e-6) and edges[-1] == pytest.approx(hi, rel=1e-6)
    total = 4 * 256 * 256
    for k in range(1, 5):
        ak = np.stack([np.linalg.matrix_power(m, k) for m in a])
        # float32 rounding may put the extreme value a hair outside our edges (asserted equal to 1e-6 above)
        ref = np.histogram(np.clip(ak, edges[0], edges[-1]), bins=edges)[0]
        got = np.asarray(st["counts"][str(k)])
        assert got.sum() == ref.sum() == total
        assert np.abs(got - ref).sum() <= 4, f"A^{k} histogram differs in {np.abs(got - ref).sum()} entries"
        if k >= 2:
            rel = [np.linalg.norm(p - q) / np.linalg.norm(q) for p, q in zip(ak, a)]
            d = st["distance"][str(k)]
            np.testing.assert_allclose(d["rel_fro_per_image"], rel, rtol=1e-6)
            w1 = [np.abs(np.sort(p, axis=None) - np.sort(q, axis=None)).mean() for p, q in zip(ak, a)]
            np.testing.assert_allclose(d["w1_per_image"], w1, rtol=1e-6)
            p1, pk = np.histogram(a, edges)[0] / total, ref / total
            assert d["tv"] == pytest.approx(0.5 * np.abs(pk - p1).sum(), abs=4 / total)
    _png_ok(data["figures"][0])


# ----------------------------------------------------------------------------------------------- filter


def test_filter_gain_against_weight_norms(loaded, tmp_path):
    data = run_filter(loaded, tmp_path / "f", images=2)
    (blk,) = data["blocks"]
    state = loaded.state
    hist = blk["lambda_histogram"]
    # the exact spectrum through the r x r core (factorizable SNL graph), equal to the dense eigh of A
    assert hist["source"].startswith("r x r core") and hist["count"] == 2 * 256
    assert hist["max"] == pytest.approx(1.0, abs=1e-6)  # sym-normalized non-negative A: top eigenvalue 1
    lam = np.asarray(blk["lambda"])
    for u in blk["units"]:
        i = u["unit"]
        w0 = state[f"{BLOCK}.units.{i}.w.0.weight"].double().numpy().reshape(16, 8)
        w1 = state[f"{BLOCK}.units.{i}.w.1.weight"].double().numpy().reshape(16, 8)
        wg = state[f"{BLOCK}.units.{i}.g.weight"].double().numpy().reshape(8, 16)
        # snl: B_0(λ) = 1, B_1(λ) = λ  ->  gain(λ) = ||W_0 + λ W_1||_2
        assert u["terms"] == ["I", "A"]
        assert u["at"]["1"]["gain"] == pytest.approx(np.linalg.norm(w0 + w1, 2), rel=1e-10)
        assert u["at"]["-1"]["gain"] == pytest.approx(np.linalg.norm(w0 - w1, 2), rel=1e-10)
        assert u["at"]["0"]["gain"] == pytest.approx(np.linalg.norm(w0, 2), rel=1e-10)
        assert u["at"]["1"]["gain_full"] == pytest.approx(np.linalg.norm((w0 + w1) @ wg, 2), rel=1e-10)
        j = int(np.argmin(np.abs(lam - 0.5)))
        g = (w0 + lam[j] * w1) @ wg
        ev = np.linalg.eigvalsh((g + g.T) / 2)
        assert u["sym_max"][j] == pytest.approx(ev[-1], rel=1e-9) and u["sym_min"][j] == pytest.approx(ev[0], rel=1e-9)
    _png_ok(data["figures"][0])


@pytest.mark.parametrize("preset", ["cayley", "heat", "wavelet"])
def test_filter_spectral_presets(preset, tmp_path):
    """Rational and exponential filters: the responses are B_t(λ) at the checkpoint's learned scales, the gain is
    ||Σ_t B_t(λ) W_t||₂, and the spectrum from the r x r core equals numpy's eigh of the dense A."""
    raw = {"data": TINY["data"], "model": {"arch": "preresnet20", "blocks": [
        {"stage": 1, "after_block": 2, "block": preset}]}}
    run = _checkpoint(tmp_path / preset, raw)
    loaded = load_run(run)
    data = run_filter(loaded, tmp_path / "f", images=2)
    (blk,) = data["blocks"]
    (u,) = blk["units"]
    state = loaded.state
    lam = np.asarray(blk["lambda"])
    scales = np.exp(state[f"{BLOCK}.units.0.spectral.log_scales"].double().numpy())
    assert u["filter"] == preset and u["scales"] == pytest.approx(scales.tolist(), rel=1e-12)
    lam_l = 1 - lam
    resp = np.asarray(u["responses"])
    if preset == "heat":
        expected = [np.ones_like(lam)] + [np.exp(-t * lam_l) for t in scales]
    elif preset == "cayley":
        c = (scales[0] * lam_l - 1j) / (scales[0] * lam_l + 1j)
        expected = [np.ones_like(lam)] + [f(c**j) for j in (1, 2) for f in (np.real, np.imag)]
    else:
        expected = [np.exp(-scales[0] * lam_l)] + [s * lam_l * np.exp(1 - s * lam_l) for s in scales[1:]]
    np.testing.assert_allclose(resp, np.stack(expected), rtol=1e-10, atol=1e-12)
    ws = [state[f"{BLOCK}.units.0.w.{t}.weight"].double().numpy().reshape(16, 8) for t in range(len(expected))]
    j = int(np.argmin(np.abs(lam - 0.3)))
    assert u["gain"][j] == pytest.approx(np.linalg.norm(sum(e[j] * w for e, w in zip(expected, ws)), 2), rel=1e-9)
    hist = blk["lambda_histogram"]
    assert hist["source"].startswith("r x r core") and hist["max"] == pytest.approx(1.0, abs=1e-6)
    _png_ok(data["figures"][0])


# ---------------------------------------------------------------------------------- attention, dynamics


def test_attention_rows_and_queries(loaded, tmp_path):
    rc = cli_main(["analyze", "attention", str(loaded.source), "--out", str(tmp_path / "att"), "--images", "2",
                   "--query", "3,3", "12,12"])
    assert rc == 0
    data = json.loads((tmp_path / "att" / "attention.json").read_text())
    (blk,) = data["blocks"]
    assert blk["feature_shape"] == [16, 16] and blk["key_shape"] == [16, 16]
    from nonlocalnet.data import build_dataset

    images = build_dataset("demo", None, "test", size=16, train_size=64, test_size=32).images[:2]
    a = _snl_affinity(loaded.state, _block_input(loaded, images))
    for b, img in enumerate(blk["images"]):
        assert [q["feature_yx"] for q in img["queries"]] == [[3, 3], [12, 12]]
        for q in img["queries"]:
            y, x = q["feature_yx"]
            np.testing.assert_allclose(np.asarray(q["row"]).ravel(), a[b, y * 16 + x], atol=1e-7)
    # default: the most salient positions, i.e. the largest response norms
    d2 = run_attention(loaded, tmp_path / "att2", images=1, top=2)
    img = d2["blocks"][0]["images"][0]
    resp = np.asarray(img["response_norm"])
    first = img["queries"][0]["feature_yx"]
    assert resp[first[0], first[1]] == pytest.approx(resp.max(), rel=1e-5)
    _png_ok(d2["figures"][0])


def test_dynamics_first_step_is_the_block(loaded, tmp_path):
    data = run_dynamics(loaded, tmp_path / "d", images=2, iterations=5)
    (blk,) = data["blocks"]
    from nonlocalnet.data import build_dataset

    images = build_dataset("demo", None, "test", size=16, train_size=64, test_size=32).images[:2]
    x0 = torch.from_numpy(_block_input(loaded, images))
    block = copy.deepcopy(loaded.blocks[BLOCK]).double().eval()
    with torch.no_grad():
        x1 = block(x0)
        x2 = block(x1)
    n0 = x0.flatten(1).norm(dim=1)
    for mode in ("block", "fixed_graph"):
        per = np.asarray(blk["modes"][mode]["per_image"])
        assert per.shape == (2, 6) and np.all(per[:, 0] == 1.0)
        np.testing.assert_allclose(per[:, 1], (x1.flatten(1).norm(dim=1) / n0).numpy(), rtol=1e-6)
    second = np.asarray(blk["modes"]["block"]["per_image"])[:, 2]
    np.testing.assert_allclose(second, (x2.flatten(1).norm(dim=1) / n0).numpy(), rtol=1e-6)
    assert blk["block"] == BLOCK and blk["modes"]["block"]["trend"] in ("decays", "grows", "stable", "diverged")
    _png_ok(data["figures"][0])


# ------------------------------------------------------------------------------------------------- cost


def _snl_lowrank_flops(c: int, n: int, units: int) -> int:
    """Hand count for SNL on the low-rank path, batch 1, C_s = C_v = C/2 (1 multiply-add = 2 FLOPs):
    θ, φ: 2·(2NC·C_s); degrees M̂1 = (P(Qᵀ1) + Q(Pᵀ1))/2: 2·(2N·C_s) (the sums are not counted);
    per unit (NonlocalUnit._lowrank_cf, A = U Vᵀ with r = 2C_s): g 2NC·C_v; ZᵀV 2N·C_v·r; M = W_1 Rᵀ 2C·C_v·r;
    F = M Uᵀ + W_0 Zᵀ: 2N·C·r + 2N·C·C_v."""
    cs = cv = c // 2
    r = 2 * cs
    per_unit = 2 * n * c * cv + 2 * n * cv * r + 2 * c * cv * r + 2 * n * c * r + 2 * n * c * cv
    return 2 * 2 * n * c * cs + 2 * 2 * n * cs + units * per_unit


def test_cost_flops_hand_count_and_table(loaded, tmp_path):
    import nonlocalnet

    for c, hw, units in ((16, 8, 1), (32, 6, 2)):
        block = nonlocalnet.build_block("snl", c, units=units).eval()
        x = torch.randn(1, c, hw, hw)
        assert count_flops(block, x) == _snl_lowrank_flops(c, hw * hw, units)
    data = run_cost(loaded, tmp_path / "c")
    assert data["input_shape"] == [3, 16, 16] and data["batch"] == 1
    (b,) = data["blocks"]
    assert b["backend_auto"] == "lowrank" and b["backend_dense"] == "dense"
    assert b["flops_auto"] == _snl_lowrank_flops(16, 256, 2)
    assert b["flops_dense"] > b["flops_auto"]
    assert data["total"]["flops"] - data["backbone"]["flops"] == b["flops_auto"]
    assert data["total"]["params"] - data["backbone"]["params"] == b["params"] == sum(
        p.numel() for p in loaded.blocks[BLOCK].parameters())
    assert b["peak_inference_dense_bytes"] > b["peak_inference_auto_bytes"] > 0
    md = (tmp_path / "c" / "cost.md").read_text()
    assert "| backbone (preresnet20) |" in md and f"| + {BLOCK} (snl, lowrank) |" in md


def test_cost_from_config_yaml_needs_no_data(tmp_path, capsys):
    raw = {"data": {"name": "cifar10", "root": str(tmp_path / "nowhere")},
           "model": {"arch": "preresnet20", "blocks": [{"stage": 2, "after_block": 1, "block": "nl"}]}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert cli_main(["analyze", "cost", str(cfg), "--out", str(tmp_path / "o"), "--no-memory"]) == 0
    data = json.loads((tmp_path / "o" / "cost.json").read_text())
    assert data["input_shape"] == [3, 32, 32] and data["run"]["num_classes"] == 10
    (b,) = data["blocks"]
    assert b["n"] == b["n_keys"] == 256 and b["backend_auto"] == "sdpa"  # exp kernel + softmax: fused attention
    assert b["flops_dense"] == b["flops_auto"]
    assert "GMACs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ errors


def test_no_block_is_an_error(tmp_path, capsys):
    run = _checkpoint(tmp_path / "base", {"data": TINY["data"], "model": {"arch": "preresnet20"}})
    for sub in ("spectrum", "affinity", "cost"):
        assert cli_main(["analyze", sub, str(run), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"no nonlocal block in {run}" in err
    assert not (tmp_path / "o").exists()  # no empty plot


def test_data_is_read_only_when_looked_at(tmp_path, capsys):
    root = tmp_path / "no-cifar"
    run = _checkpoint(tmp_path / "cifar", {"data": {"name": "cifar10", "root": str(root)}, "model": {
        "arch": "preresnet20", "blocks": [{"stage": 2, "after_block": 1, "block": "nl"}]}}, num_classes=10)
    assert cli_main(["analyze", "spectrum", str(run), "--out", str(tmp_path / "s")]) == 0
    assert cli_main(["analyze", "filter", str(run), "--no-data", "--out", str(tmp_path / "f")]) == 0
    capsys.readouterr()
    assert cli_main(["analyze", "affinity", str(run), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'cifar10'" in err and str(root) in err and "--data-root" in err and "test" in err


def test_report_without_data_skips_only_the_data_sections(tmp_path):
    root = tmp_path / "no-cifar"
    run = _checkpoint(tmp_path / "cifar", {"data": {"name": "cifar10", "root": str(root)}, "model": {
        "arch": "preresnet20", "blocks": [{"stage": 3, "after_block": 1, "block": "snl"}]}}, num_classes=10)
    page = write_report(run, tmp_path / "rep", memory=False)
    text = page.read_text()
    assert text.count('<p class="note">skipped: the report looks at data') == 3  # affinity, attention, dynamics
    assert str(root) in text and "λ histograms skipped" in text
    assert len(re.findall(r"<img ", text)) == 2  # spectrum, filter (gain only); no metrics.jsonl in this run dir
    assert 'id="cost"' in text and "+ stage3.0.nonlocal_block (snl, lowrank)" in text


def test_missing_checkpoint_message(tmp_path, capsys):
    assert cli_main(["analyze", "spectrum", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["analyze", "spectrum", str(tmp_path / "empty")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ report

_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
});
</script>"""


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chrome_args(exe: str, profile: Path) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]


def test_report_renders_in_chromium(run_dir, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI for the report test (apt-get install -y chromium)")
        print("test_report_renders_in_chromium: skipped, chromium not installed and CI is unset")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI is unset")
    page = write_report(run_dir, tmp_path / "report", images=4, iterations=10)
    text = page.read_text()
    n_img = len(re.findall(r"<img ", text))
    assert n_img == 7  # metrics, spectrum, its evolution, affinity, attention, filter, dynamics
    assert "src=\"http" not in text and "src=\"file" not in text  # self-contained
    for section in ("spectrum", "affinity", "attention", "filter", "dynamics", "cost"):
        assert f'id="{section}"' in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE + "</body>"))
    dom = subprocess.run([*_chrome_args(exe, tmp_path / "p1"), "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=90)
    m = re.search(r'<body[^>]*data-images-total="(\d+)"[^>]*data-images-loaded="(\d+)"', dom.stdout)
    assert m, f"no marker in the DOM: rc={dom.returncode} stderr={dom.stderr[-800:]}"
    assert int(m.group(1)) == n_img and int(m.group(2)) == n_img, m.group(0)
    shot = tmp_path / "shot.png"
    res = subprocess.run([*_chrome_args(exe, tmp_path / "p2"), f"--screenshot={shot}", "--window-size=1200,3000",
                          "--hide-scrollbars", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert shot.is_file(), res.stderr[-800:]
    with Image.open(shot) as im:
        assert im.size == (1200, 3000)
        a = np.asarray(im.convert("RGB"), dtype=float)
    assert a.std() > 10 and (a.reshape(-1, 3).std(0) > 1).any()  # not blank: text and figures rendered


# ---------------------------------------------------------------------------------- a model given in Python


def test_every_analysis_on_a_model_given_in_python(tmp_path):
    """Loaded.from_model: no run dir, no config; cost's backbone is the model with its blocks taken out, the
    data-based analyses take a batch given in Python and say so when they have none."""
    from nonlocalnet.analysis import (
        AnalysisError,
        Batch,
        DataError,
        run_affinity,
        run_attention,
        run_cost,
        run_dynamics,
        run_filter,
        run_spectrum,
        write_report,
    )
    from nonlocalnet.models import build_model, insert_blocks
    from nonlocalnet.runs import Loaded

    net = build_model("preresnet20", 10)
    insert_blocks(net, {"stage": 2, "after_block": 2, "block": "snl"}, input_shape=(3, 32, 32))
    loaded = Loaded.from_model(net, input_shape=(3, 32, 32))
    assert list(loaded.blocks) == ["stage2.1.nonlocal_block"] and loaded.cfg is None and not net.training
    cost = run_cost(loaded, tmp_path / "cost", memory=False)
    assert cost["backbone"]["params"] == 272_282  # PreResNet-20, 10 classes (docs/models.md)
    block = loaded.blocks["stage2.1.nonlocal_block"]
    assert cost["plus"]["params"] == sum(p.numel() for p in block.parameters())
    assert cost["blocks"][0]["input_shape"] == [1, 32, 16, 16] and cost["run"]["arch"] == "PreResNet"
    spec = run_spectrum(loaded, tmp_path / "spectrum")
    assert spec["blocks"][0]["in_channels"] == 32 and spec["evolution"] is None
    with pytest.raises(DataError, match="model given in Python without a config.*Batch.from_tensor"):
        run_affinity(loaded, tmp_path / "aff")
    batch = Batch.from_tensor(torch.randn(3, 3, 32, 32))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (3, 3, 32, 32)
    assert int(batch.images.min()) == 0 and int(batch.images.max()) == 255
    aff = run_affinity(loaded, tmp_path / "aff", batch=batch)
    assert aff["blocks"][0]["n"] == aff["blocks"][0]["n_keys"] == 256
    run_attention(loaded, tmp_path / "att", batch=batch, images=2)
    run_filter(loaded, tmp_path / "filt", batch=batch, images=2)
    run_dynamics(loaded, tmp_path / "dyn", batch=batch, iterations=3)
    page = write_report(loaded, tmp_path / "report", batch=batch, images=2, iterations=3, memory=False)
    text = page.read_text()
    assert "PreResNet" in text and "stage2.1.nonlocal_block (snl)" in text
    # without an input shape, cost says how to give one (the model says nothing)
    with pytest.raises(AnalysisError, match=r"input shape of PreResNet is unknown.*input_shape="):
        bare = build_model("preresnet20", 10)
        bare.dry_run_input_shape = None
        insert_blocks(bare, {"stage": 1, "block": "nl"}, input_shape=(3, 32, 32))
        run_cost(Loaded.from_model(bare), tmp_path / "c2", memory=False)
