# Fresh-machine entry points (see README): `make demo` and `make test`. `make test-fast` is the developer loop.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the folders installed as paligemma_edge.<name> (pyproject's package-dir)
PACKAGES := export quant runtime benchmarks serve eval label shapes random_checkpoints
# llama-cpp-python builds from source with ggml's CPU code as run-time modules, one per x86-64 level (haswell,
# skylakex, zen4, sapphirerapids …): runtime/backends/ggml_cpu.py loads the best one the CPU runs, AMX only where
# Linux grants it. Never -march=native (it died with SIGILL on the Xeon VMs). The wheel takes ~10 minutes on 2 cores
# once and is kept in LLAMA_WHEELS, named by version and flags: pip's own cache would hand back a wheel built with
# other CMAKE_ARGS.
LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_BACKEND_DIR:STRING=llama_cpp/lib \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/paligemma-edge/wheels/$(shell echo '$(LLAMA_PIN) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)

.PHONY: setup demo test test-fast lint typecheck browser

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build. pip's own output goes to
# a log (shown if a step fails), so the demo prints only this project's output.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	@echo "setting up $(VENV) (the first time ~20 minutes: llama-cpp-python builds from source; log: $(VENV)/setup.log)"
	@$(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install -q --upgrade pip && \
	   $(BIN)/python -m pip install -q torch==2.13.0 && \
	   { ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || { rm -rf $(LLAMA_WHEELS).partial-$$$$ && \
	     CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel -q --no-deps \
	       --no-cache-dir "$(LLAMA_PIN)" -w $(LLAMA_WHEELS).partial-$$$$ && \
	     rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial-$$$$ $(LLAMA_WHEELS); }; } && \
	   $(BIN)/python -m pip install -q --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl && \
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
