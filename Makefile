# nonlocalnet developer commands. `make test` works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The second test environment: torchvision and timm (the `vision` extra) beside the torch they are built for.
VISION_VENV ?= .venv-vision
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1
VBIN := $(VISION_VENV)/bin

.PHONY: test test-interop lint venv vision-venv demo bench bench-peers clean

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
	$(VBIN)/pip install -q -e ".[dev,vision]"
	touch $@

vision-venv: $(VISION_VENV)/.installed

# The tests marked `interop` (torchvision / timm models through insert, train, eval, analyze); `make test`
# deselects them.
test-interop: vision-venv
	$(VBIN)/pytest -m interop

# The main job on the bundled default: baseline / +NL / +SNL on the generated task, then runs/demo/report.html.
demo: venv
	$(BIN)/nonlocalnet demo

bench: venv
	$(BIN)/nonlocalnet bench --quick

# The public modules themselves (timm, mmcv-lite: the extra `peers`, in the vision environment) against our blocks,
# weights mapped through compat, checked equal in float64, then timed: 1 thread pinned to one core, then 2 threads;
# each table measured in 3 fresh processes (docs/benchmarks.md).
bench-peers: vision-venv
	taskset -c 1 $(VBIN)/python -m nonlocalnet bench --baseline peers --threads 1 --processes 3
	$(VBIN)/python -m nonlocalnet bench --baseline peers --threads 2 --processes 3

clean:
	rm -rf $(VENV) $(VISION_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
