# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DALI_EXTRA ?= cuda13
DEMO_OUT ?= demo_out
# pytest-xdist workers: one per core by default (`make test WORKERS=0` runs in one process).
WORKERS ?= auto
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-fast docs docs-build lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(DALI_EXTRA),dev,ray]'
	touch $@

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_OUT)

# Every test (unit, cli, system), in parallel over the cores, and the docs built strictly.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $(CURDIR)/build/site
	$(PY) -m pytest -q -n $(WORKERS) --durations=15

# The unit and cli tests only: no servers, torchrun or signals.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(WORKERS) -m "unit or cli"

# The documentation site on http://127.0.0.1:8000 (loopback only), rebuilt as the pages change.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build/site site
