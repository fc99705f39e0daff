# `make test` and `make demo` each build .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo relink bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Re-install when the project metadata changes. "strict" editable mode builds a
# link tree with the real import layout (sdk/ -> sourcefree/), which mypy reads.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[adapt,dev]" --config-settings editable_mode=strict
	touch $(STAMP)

# New source files need a fresh link tree; this is cheap once dependencies are in.
relink: | $(STAMP)
	$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict

test: $(STAMP) relink
	$(VENV)/bin/ruff check sdk adapters export tests examples benchmarks
	$(VENV)/bin/ruff format --check sdk adapters export tests examples benchmarks
	$(VENV)/bin/mypy -p sourcefree
	$(VENV)/bin/mypy tests examples benchmarks
	$(VENV)/bin/pytest -q

demo: $(STAMP) relink
	$(VENV)/bin/sourcefree demo

bench: $(STAMP) relink
	$(PY) benchmarks/runtime.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
