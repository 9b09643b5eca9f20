# `make demo` and `make test` work on a fresh clone: each creates .venv from the project's
# own files when it is missing (or when pyproject.toml / constraints.txt changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lynx-installed

.PHONY: demo test test-gpu gpu-check lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,bench,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(PY) -m ruff check lynx_sglang tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

# On a GPU machine with torch and triton only (no SGLang, no venv): every GPU test and
# benchmark in one command, results under bench/results/gpu/.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m bench.gpu_check
