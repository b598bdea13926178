# The two commands of README: `make demo` and `make test`. Each sets everything up
# on a fresh machine: a virtual environment in .venv that sees the system's
# packages, so an existing torch is used as it is and never replaced. Only where no
# torch is importable does it install torch==2.13.0 (the CPU wheel on this disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
OUT_DIR ?= perf/results/gpu
GPU_CHECK_ARGS ?=

.PHONY: install test demo gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,perf]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m triton_adadelta.demo

# Proves the kernel on a GPU in at most 8 minutes (README, "GPU check"). It uses
# $(PYTHON) and the torch and triton it has as they are, and downloads nothing: the
# package is installed without dependencies or an index, and where even that fails,
# perf/gpu_check.py runs it from this source tree.
gpu-check:
	-$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
	$(PYTHON) perf/gpu_check.py --out $(OUT_DIR) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
