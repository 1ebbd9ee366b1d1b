# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is installed first, as the CPU build: a bare `torch`
# requirement would pull several GB of CUDA wheels. Elsewhere, point TORCH_INDEX at the CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
SHARED ?= ../shared
BIN := $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/posequant demo -o demo-out $(if $(wildcard $(SHARED)/models),--shared $(SHARED))

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
