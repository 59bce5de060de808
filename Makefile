# Two commands do all the set-up: `make demo` and `make test`.
# Each creates .venv if missing, installs torch first and exactly (a CPU build on CPU machines;
# override TORCH_SPEC on GPU machines), then the package pinned by constraints.txt.
# The install is skipped when pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.card-installed
PYTEST_ARGS ?=

export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: install models test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The real models the tests and benchmarks use (sha256-checked; a no-op when already cached).
models: $(STAMP)
	$(VENV)/bin/card fetch-model smollm2-135m-instruct

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/card demo --overwrite

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
