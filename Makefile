# nonlocalnet developer commands. `make test` works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The second test environment: torchvision and timm (the `vision` extra) beside the torch they are built for, and
# mmengine (the `openmmlab` extra) with mmcv-lite (mmcv without compiled ops: its build_plugin_layer) and mmsegmentation
# (the peer of bench --baseline peers' dnl/mmseg), so that the
# OpenMMLab tests run there.
VISION_VENV ?= .venv-vision
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1
VISION_MMCV ?= mmcv-lite mmsegmentation
VBIN := $(VISION_VENV)/bin

.PHONY: test test-interop test-gpu lint venv vision-venv demo bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned, so pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest

# torch and torchvision are pinned together, first (pip only); then timm, then the package with its extra.
$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VBIN)/pip install -q $(VISION_TORCH)
	$(VBIN)/pip install -q timm
	$(VBIN)/pip install -q -e ".[dev,vision,openmmlab]"
	$(VBIN)/pip install -q $(VISION_MMCV)
	touch $@

vision-venv: $(VISION_VENV)/.installed

# The tests marked `interop` (torchvision / timm models through insert, train, eval, analyze; OpenMMLab configs
# through mmengine and mmcv-lite); `make test` deselects them.
test-interop: vision-venv
	$(VBIN)/pytest -m interop

# The CUDA checks (tests/test_gpu.py): every preset x backend x dtype on CUDA against the float64 CPU reference, the
# fused SDPA kernels, the spectral filters' exact paths, 20 training steps, bench on CUDA. Skipped (all of them,
# cleanly) where torch sees no CUDA device. GPU_PYTHON: a Python whose torch has CUDA (default: the venv's); on a
# lent GPU machine `.ci/gpu-check OUT` runs the same with that machine's python3 and writes the results to OUT.
GPU_PYTHON ?= $(BIN)/python
test-gpu: venv
	PYTHONPATH=src $(GPU_PYTHON) -m pytest -m gpu tests/test_gpu.py -rs
# The product as a pip user gets it: build the sdist and wheel, install the wheel into a fresh venv in a temp dir
# (CPU torch pinned first) and run the CLI from an empty directory (.ci/test-wheel; ~4 min, most of it pip).
.PHONY: test-wheel
test-wheel: venv
	PYTHON=$(PYTHON) BUILD_PYTHON=$(BIN)/python TORCH="$(TORCH)" .ci/test-wheel

# The main job on the bundled default: baseline / +NL / +SNL on the generated task, then runs/demo/report.html.
demo: venv
	$(BIN)/nonlocalnet demo

bench: venv
	$(BIN)/nonlocalnet bench --quick

# The public modules themselves (timm, mmcv-lite, mmsegmentation: the extra `peers`, in the vision environment) against our blocks,
# weights mapped through compat, checked equal in float64, then timed: 1 thread pinned to one core, then 2 threads;
# each table measured in 3 fresh processes (docs/benchmarks.md).
bench-peers: vision-venv
	taskset -c 1 $(VBIN)/python -m nonlocalnet bench --baseline peers --threads 1 --processes 3
	$(VBIN)/python -m nonlocalnet bench --baseline peers --threads 2 --processes 3

clean:
	rm -rf $(VENV) $(VISION_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
