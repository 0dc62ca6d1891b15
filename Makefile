# Self-installing entry points. `make test` and `make demo` create .venv on first use; re-runs reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= curation,slurm,dev
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test slurm-deps demo bench lint clean-venv gpu-check gpu-carry mutants

# torch first, from the pinned wheels (ENVIRONMENT.md); a stamp keeps re-runs from reinstalling.
$(VENV)/.torch-stamp:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q $(TORCH_PINS)
	touch $@

# the project, editable, with its extras; redone only when pyproject.toml changes.
$(VENV)/.project-stamp: $(VENV)/.torch-stamp pyproject.toml
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.project-stamp

# slurm-deps first: tests/test_slurm.py starts a real one-node SLURM cluster (CI=true: must run, not skip)
test: install slurm-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# SLURM + munge from apt when root and missing; returns at once when installed. A failed install does
# not stop the suite: the SLURM tests then skip (or fail under CI=true) and say why.
slurm-deps:
	-@bash tools/install_slurm.sh --if-root

demo: install
	$(PY) -m dinov2.launch.train_cli --config configs/train/demo.yaml

bench: install
	$(PY) benchmarks/throughput.py

# On a lent GPU machine (no package index, no .venv): python3 there holds torch; the script installs the
# carried wheels itself when omegaconf is missing. Results: $(OUT)/gpu_check when OUT is set, else outputs/.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# Before such a call, on this machine: the pure-Python wheels and the CIFAR-10 blobs, into the ignored .carry/
SHARED ?= ../shared
gpu-carry:
	mkdir -p .carry/wheels
	cp $(SHARED)/wheels/py312/*.whl .carry/wheels/
	rm -rf .carry/cifar10 && cp -r $(SHARED)/data/cifar10 .carry/cifar10
	du -sh .carry

lint: install
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)

# Plant the catalogued bugs one at a time in a scratch copy and run the fast tests that should catch each
# (tools/mutants.py); the table goes to docs/TESTING.md. ~15-25 min on 2 cores: not part of `make test`.
mutants: install
	$(PY) tools/mutants.py --baseline --markdown docs/TESTING.md
