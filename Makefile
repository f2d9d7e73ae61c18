# Fresh-machine entry points (see README): `make demo` and `make test`. `make test-fast` is the developer loop.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the folders installed as paligemma_edge.<name> (pyproject's package-dir)
PACKAGES := export quant runtime benchmarks serve eval label shapes random_checkpoints
# llama-cpp-python builds from source: portable x86-64 (AVX2/FMA/F16C), never -march=native or AMX: ggml's AMX code
# dies with SIGILL where Linux grants AMX only on request (arch_prctl). pip caches the wheel (~10 min on 2 cores once).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup demo test test-fast lint typecheck browser

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build. pip's own output goes to
# a log (shown if a step fails), so the demo prints only this project's output.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setting up $(VENV) (the first time ~15 minutes: llama-cpp-python builds from source; log: $(VENV)/setup.log)"
	@$(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install -q --upgrade pip && \
	   $(BIN)/python -m pip install -q torch==2.13.0 && \
	   CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	   $(BIN)/python -m pip install -q -c constraints.txt -e ".[export,dev]" ) > $(VENV)/setup.log 2>&1 || \
	   { tail -n 40 $(VENV)/setup.log; echo "setup failed: see $(VENV)/setup.log"; exit 1; }
	@touch $@

demo: setup
	@$(BIN)/paligemma-edge demo demo_out

lint: setup
	$(BIN)/ruff check .

# mypy checks the installed layout: a tree of links that puts each folder where it is installed (paligemma_edge.*)
typecheck: setup
	@rm -rf build/typecheck/paligemma_edge && mkdir -p build/typecheck/paligemma_edge
	@ln -s $(CURDIR)/paligemma_edge/*.py build/typecheck/paligemma_edge/
	@for package in $(PACKAGES); do ln -s $(CURDIR)/$$package build/typecheck/paligemma_edge/$$package; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p paligemma_edge

# the server's page is tested in a real headless browser: Debian's chromium and its driver
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test: lint typecheck browser
	$(BIN)/python -m pytest -q

# minutes instead of a quarter of an hour: no slow, browser or llama.cpp tests (CI runs everything: make test)
test-fast: lint typecheck
	$(BIN)/python -m pytest -q -m "not slow and not browser and not llamacpp"
