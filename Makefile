# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
THREADS ?= 1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: on these machines a local CPU wheel; unpinned pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lorakit demo

test: setup
	$(PY) -m pytest -p no:cacheprovider tests

bench: setup
	$(PY) -m benchmarks.run --threads $(THREADS)

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache .hypothesis
