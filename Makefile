# ftlm: `make demo` and `make test` are the quick start; both install into .venv first when needed.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_DIR ?= $(HOME)/.cache/ftlm/runs/demo
# On a machine without a GPU, tests and the demo stay on the CPU.
export PYTHONUNBUFFERED=1

.PHONY: install demo test test-fast lint bench clean help

help:
	@echo "make demo   prepare the embedded Korean-English corpus and pretrain the tiny model (CPU when no GPU)"
	@echo "make test   lint, then run the test suite (CPU)"
	@echo "make lint   ruff check and ruff format --check"
	@echo "make bench  run the kernel, data and training-step benchmarks (GPU for the kernel and step tables)"
	@echo "make install  create .venv and install ftlm with its dependencies and its C++/CUDA extension"

install: $(STAMP)

# torch comes first so that the extension's build (run without build isolation) compiles against it. The rest goes
# through uv, which resolves and downloads in parallel (1 min 20 s on 2 cores against pip's 2 min 30 s), held by a
# constraint to the torch already there; where uv cannot install them (an index only pip is configured for),
# or with INSTALLER=pip, pip does.
INSTALLER ?= uv
PIP_DEPS := $(PIP) install -q --no-build-isolation -e ".[dev]"

$(STAMP): pyproject.toml setup.py $(wildcard csrc/* csrc/*/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch numpy pybind11 ninja $(filter uv,$(INSTALLER))
	@echo "installing ftlm and its dependencies with $(INSTALLER)"
	@if [ "$(INSTALLER)" = uv ]; then \
	  $(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt; \
	  $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -c $(VENV)/torch-constraint.txt \
	    --no-build-isolation -e ".[dev]" || { echo "uv could not install ftlm's dependencies (above); pip will"; \
	    $(PIP_DEPS); }; \
	else $(PIP_DEPS); fi
	@$(PY) -c "import ftlm.kernels.ext as e; print('ftlm._C extension:', 'built' if e.has_extension() else 'missing (PyTorch fallback)')"
	@$(PY) -c "from ftlm.data.native import text_ops; print('ftlm._text extension:', 'built' if text_ops() else 'missing (numpy fallback)')"
	@touch $@

demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/ftlm-train model=tiny data=embedded trainer=demo trainer.out_dir=$(DEMO_DIR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest workers (pytest-xdist), one test file each at a time: most tests start processes that spend their time
# importing torch on one core. TEST_WORKERS=1 runs them serially.
TEST_WORKERS ?= 2

test: install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests -m "not slow"

bench: install
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info ftlm/_C*.so ftlm/_text*.so
