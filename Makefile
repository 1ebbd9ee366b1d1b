# Set-up commands (see README): `make demo` runs the main job, `make test` runs the tests, `make test-avx2`
# runs the AVX2 kernel checks under qemu. They create .venv on first use and install exactly the versions
# in $(LOCK) (with hashes), so every clone runs what was tested; `make lock` refreshes the lock, `make
# test-latest` tries the newest versions pyproject allows first. torch is installed first, as the CPU
# build: a bare `torch` requirement would pull several GB of CUDA wheels. Elsewhere, point TORCH_INDEX at
# the CPU index:   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP ?= pip==26.3
UV ?= uv==0.13.9
LOCK ?= requirements/dev.lock
LATEST ?= .venv-latest
SHARED ?= ../shared
BIN := $(VENV)/bin
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# where `make lock` finds torch's CPU build: this machine's wheel folder, else PyTorch's CPU index
TORCH_FIND ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url \
  $(or $(TORCH_INDEX),https://download.pytorch.org/whl/cpu) --index-strategy unsafe-best-match)
# qemu's TCG emulates AVX2 (Haswell) and SSE4.2 (Nehalem), not AVX-512 or VNNI; the features it lacks are
# switched off so it does not warn about each
HASWELL := Haswell-v4,-pcid,-x2apic,-tsc-deadline,-invpcid,-spec-ctrl
NEHALEM := Nehalem-v1
QEMU_PYTEST := -m pytest -q --noconftest -p no:cacheprovider tests/test_saturation_kernels.py

.PHONY: install demo test test-avx2 test-latest lock clean

install: $(VENV)/.installed

# --no-deps everywhere: the lock is the whole environment (pip check proves it consistent)
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP)"
	$(BIN)/python -m pip install -q --no-deps "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

demo: install
	$(BIN)/posequant demo -o demo-out $(if $(wildcard $(SHARED)/models),--shared $(SHARED))

test: install
	$(BIN)/python -m pytest -q

# ONNX Runtime's and OpenVINO's real AVX2 (and SSE4.2) kernels under qemu-user, on any x86-64 CPU:
# correctness only, nothing is timed under emulation (docs/int8-on-x86.md)
test-avx2: install
	scripts/install_qemu.sh
	POSEQUANT_TEST_EXPECT_KIND=avx2 qemu-x86_64 -cpu $(HASWELL) $(BIN)/python $(QEMU_PYTEST)
	POSEQUANT_TEST_EXPECT_KIND=x86 qemu-x86_64 -cpu $(NEHALEM) $(BIN)/python $(QEMU_PYTEST)
	$(BIN)/python -m pytest -q --qemu -m qemu

# The newest versions pyproject allows (torch stays the CPU build), in their own venv; not part of CI.
# When it passes, `make lock` and commit the lock with the fixes it needed.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[dev]"
	$(LATEST)/bin/python scripts/lock_diff.py $(LOCK)
	POSEQUANT_UNLOCKED=1 $(LATEST)/bin/python -m pytest -q

# Re-resolve every dependency to the newest versions pyproject allows, with hashes, into $(LOCK).
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install -q "$(UV)")
	echo "$(TORCH)" > .venv-lock/torch.txt
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev --upgrade --generate-hashes \
	  --python-version $(PY_VERSION) -c .venv-lock/torch.txt $(TORCH_FIND) --no-emit-package torch \
	  --custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock demo-out .pytest_cache
