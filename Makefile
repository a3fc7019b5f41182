# cpu-arena: every target uses the project's own .venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= deploy/models.toml
STAMP  := $(VENV)/.installed

.PHONY: setup system models up down status logs check test test-fast lint download eval bench anchor worker clean

setup: system $(STAMP) models  ## system packages, .venv with exact pins, then fetch + convert the embedded models

# Debian packages pip cannot provide (chromium for the browser tests, the report's CJK font, emoji font).
# Installs what is missing when root, else prints the apt-get command and fails; instant when all are there.
system:
	@bash deploy/system-packages.sh

$(STAMP): pyproject.toml deploy/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, with its exact pin: it takes the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install -q -c deploy/constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c deploy/constraints.txt -e '.[dev]'
	$(PY) -m pip check
	@touch $(STAMP)

models: $(STAMP)
	$(PY) -m launch.embedded

up: $(STAMP)
	$(PY) -m launch up --config $(CONFIG)

down:
	@$(PY) -m launch down --config $(CONFIG)

status:
	@$(PY) -m launch status --config $(CONFIG)

logs:
	@$(PY) -m launch logs --config $(CONFIG)

check: $(STAMP)
	$(PY) -m launch check --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest

# No stack, no browser, no embedded models, nothing marked slow: a fresh checkout can run it before `make models`.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not stack and not browser and not models and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

download: $(STAMP)
	$(PY) -m launch download --config $(if $(filter deploy/models.toml,$(CONFIG)),deploy/seed-models.toml,$(CONFIG)) $(MODEL)

eval: $(STAMP)
	$(PY) -m evals run --config $(CONFIG)
	$(PY) -m evals report latest --config $(CONFIG)

bench: $(STAMP)
	$(PY) -m bench --config $(CONFIG) $(ARGS)

# Optional: llama.cpp as `make bench`'s anchor (bench/llamacpp.py). llama-cpp-python is compiled from its PyPI sdist
# for this CPU (-march=native: AVX-512 and its bf16 units where the CPU has them; 6-18 min on 2 cores); the sdist is
# kept in $(ANCHOR_SRC), where the bench takes llama.cpp's own converter (vendor/llama.cpp) to write BF16 GGUFs.
# Installed once: to rebuild (other flags, another CPU), `$(PY) -m pip uninstall -y llama-cpp-python` first.
ANCHOR_SRC  := $(HOME)/.cache/cpu-arena/llama.cpp
ANCHOR_CMAKE ?= -DGGML_NATIVE=ON
anchor: $(STAMP)
	@mkdir -p $(ANCHOR_SRC)
	$(PY) -m pip download -q --no-deps --no-binary :all: -c deploy/constraints.txt -d $(ANCHOR_SRC) llama-cpp-python
	@start=$$(date +%s); \
	CMAKE_ARGS="$(ANCHOR_CMAKE)" $(PY) -m pip install -q --no-cache-dir -c deploy/constraints.txt \
		--find-links $(ANCHOR_SRC) -e '.[dev,anchor]' && $(PY) -m pip check && \
	echo "anchor: llama-cpp-python $$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)') installed in $$(( $$(date +%s) - start )) s"

worker: $(STAMP)
	$(PY) -m launch worker --config $(CONFIG) $(ARGS)

clean: down
	rm -rf run
