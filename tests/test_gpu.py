"""The device-dependent checks on CUDA (`make test-gpu`, or `.ci/gpu-check OUT` on a lent GPU machine).

Every preset × backend on CUDA against the float64 CPU reference (float32, and bfloat16/float16 under autocast),
forward and backward; SDPA's fused kernels really taken (each forced alone, so a call that does not qualify for
it fails instead of falling back); the spectral filters' exact paths (``matrix_exp``, the complex solve) and the
custom autograd functions on CUDA; 20 training steps of PreResNet-20 + SNL on CUDA through ``nonlocalnet train``;
``bench --device cuda --json``. Marked ``gpu`` and skipped where no CUDA device is present: ``make test``
deselects them, ``make test-gpu`` runs them (all skipped on a CPU-only machine).
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

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.kernels import valid_backends
from nonlocalnet.testing import randomize

# NONLOCALNET_TEST_DEVICE=cpu runs the same checks on the CPU (to check the checks themselves on a machine without
# a GPU; the fused-kernel and bench assertions are CUDA's and may not hold there)
DEVICE = os.environ.get("NONLOCALNET_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="no CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {1: (2, 16, 11), 2: (2, 16, 6, 5), 3: (2, 16, 3, 4, 3)}
SPECTRAL = ("cayley", "heat", "wavelet")


def _opts(name: str) -> dict:
    return {"reduction": 2} if name == "cc" else {}


def _backends(name: str) -> list[str]:
    preset = nonlocalnet.PRESETS[name]
    return list(valid_backends(preset.defaults.get("kernel", "embedded_gaussian"),
                               preset.defaults.get("normalization", "softmax"), preset.mode))


CASES = [(n, b) for n in nonlocalnet.list_blocks() for b in _backends(n)]


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 means float32: TF32 matmuls would blur the comparison with the float64 reference."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(name: str, backend: str, dim: int = 2):
    """A randomized float64 CPU block, its reference output and input gradient, and the same block on CUDA."""
    cpu = randomize(nonlocalnet.build_block(name, 16, dim=dim, backend=backend, **_opts(name))).double().eval()
    x = torch.randn(SHAPES[dim], dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    want = ref.forward(cpu, x)
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(cpu(x), x, g)
    cuda = nonlocalnet.build_block(name, 16, dim=dim, backend=backend, **_opts(name)).to(DEVICE).eval()
    cuda.load_state_dict(cpu.state_dict())
    return cpu, x.detach(), want.detach(), g, gx, cuda


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name,backend", CASES)
def test_float32_on_cuda_equals_the_reference(name, backend, dim):
    _, x, want, g, gx, block = _pair(name, backend, dim)
    block.float()
    xc = x.float().to(DEVICE).requires_grad_(True)
    y = block(xc)
    (gxc,) = torch.autograd.grad(y, xc, g.float().to(DEVICE))
    assert y.dtype == torch.float32 and y.device.type == DEVICE
    assert _rel(y, want) < 1e-4, f"{name}/{backend}: forward"
    assert _rel(gxc, gx) < 1e-3, f"{name}/{backend}: backward"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,backend", CASES)
def test_autocast_on_cuda(name, backend, dtype):
    """Under autocast the block runs in half precision where PyTorch says so; the output stays finite and within
    half-precision error of the reference (bf16 has 8 bits of mantissa)."""
    _, x, want, g, gx, block = _pair(name, backend)
    block.float()
    xc = x.float().to(DEVICE).requires_grad_(True)
    with torch.autocast(DEVICE, dtype=dtype):
        y = block(xc)
    (gxc,) = torch.autograd.grad(y.float(), xc, g.float().to(DEVICE))
    assert torch.isfinite(y).all() and torch.isfinite(gxc).all()
    tol = 6e-2 if dtype == torch.bfloat16 else 1e-2
    assert _rel(y.float(), want) < tol, f"{name}/{backend}/{dtype}: forward"
    assert _rel(gxc, gx) < 3 * tol, f"{name}/{backend}/{dtype}: backward"


@pytest.mark.parametrize("kernel_name", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_takes_the_fused_kernel(kernel_name, dtype):
    """With only that fused kernel allowed, a call that does not qualify raises instead of falling back: the
    block's sdpa path really runs on it (head dim C_s = 32, contiguous (B, 1, N, C_s) views)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = randomize(nonlocalnet.build_block("nl", 64, backend="sdpa")).to(DEVICE).to(dtype).eval()
    x = torch.randn(2, 64, 16, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    with sdpa_kernel([getattr(SDPBackend, kernel_name)]):
        y = block(x)
        y.float().square().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        want = block(x.detach())
    assert torch.isfinite(x.grad).all()
    assert _rel(y.float(), want.double().cpu()) < 2e-2


@pytest.mark.parametrize("name", SPECTRAL)
def test_spectral_exact_paths_on_cuda(name):
    """matrix_exp (heat, wavelet) and the complex solve (Cayley) of the exact path, in float64 on CUDA, equal
    the CPU's, gradients included; gradcheck on CUDA."""
    for path in ("exact", "chebyshev"):
        cpu = randomize(nonlocalnet.build_block(name, 8, spectral_path=path)).double().eval()
        x = torch.randn(2, 8, 5, 4, dtype=torch.float64, requires_grad=True)
        y = cpu(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        cuda = nonlocalnet.build_block(name, 8, spectral_path=path).double().to(DEVICE).eval()
        cuda.load_state_dict(cpu.state_dict())
        xc = x.detach().to(DEVICE).requires_grad_(True)
        yc = cuda(xc)
        (gxc,) = torch.autograd.grad(yc.square().sum(), xc)
        torch.testing.assert_close(yc.cpu(), y.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gxc.cpu(), gx, rtol=1e-8, atol=1e-8)
    small = randomize(nonlocalnet.build_block(name, 4)).double().to(DEVICE).eval()
    xs = torch.randn(1, 4, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(small, (xs,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["nl", "snl", "cc", "cgnl", "gc"])
def test_custom_autograd_gradcheck_on_cuda(name):
    """The structured paths' autograd (low-rank, criss-cross, channels, unary) in float64 on CUDA."""
    block = randomize(nonlocalnet.build_block(name, 4, **_opts(name))).double().to(DEVICE).eval()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_twenty_training_steps_on_cuda(tmp_path):
    """PreResNet-20 + SNL, 320 images / batch 16 = 20 steps, through `nonlocalnet train` on CUDA; the checkpoint
    it writes loads on the CPU."""
    cfg = {"data": {"name": "demo", "size": 32, "options": {"train_size": 320, "test_size": 64}},
           "model": {"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl"}]},
           "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "milestones": []},
           "run": {"device": DEVICE, "out": str(tmp_path / "run")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "nonlocalnet", "train", str(tmp_path / "cfg.yaml")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert row["epoch"] == 1 and 0 < row["train_loss"] < 10 and 0 <= row["top1"] <= 100
    e = subprocess.run([sys.executable, "-m", "nonlocalnet", "eval", str(tmp_path / "run"), "--set",
                        "run.device=cpu"], env=_env(), capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    assert 0 <= json.loads(e.stdout.strip().splitlines()[-1])["top1"] <= 100


def test_bench_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "nonlocalnet", "bench", "--quick", "--device", DEVICE, "--json",
                        str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["rows"] and all(row["time_ms"] > 0 for row in data["rows"] if row.get("time_ms") is not None)
    assert DEVICE in json.dumps(data["environment"]).lower()
