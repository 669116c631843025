# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Torch is installed first, pinned, before anything that depends on it (else pip resolves it on its
# own). Newest leg: the newest torch inside pyproject.toml's range, pinned in ci/torch-newest.txt
# (`make test TORCH=2.13.0` picks another); lowest leg: ci/constraints-lowest.txt.
TORCH ?=
TORCH_REQ = $(if $(TORCH),"torch==$(TORCH)",-r ci/torch-newest.txt)

# The lowest supported versions (ci/constraints-lowest.txt) get a venv of their own, and the project
# goes in as a user gets it: the built wheel, installed NOT editable. CI runs both legs.
VENV_LOWEST ?= .venv-lowest
STAMP_LOWEST := $(VENV_LOWEST)/.installed
WHEELHOUSE := $(VENV_LOWEST)/wheelhouse
# The installed leg runs what a wheel holds: everything but the benchmarks (they stage their own wheel
# from the checkout) and the research notebooks (checkout-only material). PYTEST_ARGS narrows further.
LOWEST_TESTS ?= tests --ignore=tests/benchmarks --ignore=tests/notebooks
PYTEST_CMD = TRITON_INTERPRET=1 pytest -m "not gpu and not slow" $(PYTEST_ARGS)

.PHONY: demo test test-lowest wheel-lowest install clean

# Tiny CPU models: one OpenMP thread per process. With more, small matmuls spend their time
# synchronising threads (measured on the 2-core box: demo 104 s with the default, 18 s with 1).
export OMP_NUM_THREADS ?= 1

$(STAMP): pyproject.toml setup.py ci/torch-newest.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing else picks it (torch 2.13.0's CPU build is on disk here;
	# newer releases come with their CUDA libraries, ~2 min, and run on the CPU too)
	$(BIN)/python -m pip install -q $(TORCH_REQ)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The lowest leg's torch, once, first: its lower bound (pip takes the release with its CUDA
# libraries, ~2 min; it runs on the CPU too), before anything that depends on it.
$(STAMP_LOWEST): pyproject.toml setup.py ci/constraints-lowest.txt
	test -x $(VENV_LOWEST)/bin/python || $(PY) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LOWEST)/bin/python -m pip install -q -c ci/constraints-lowest.txt torch
	touch $(STAMP_LOWEST)

# Build the wheel (from a fresh build/: setuptools would pack files an earlier build left there),
# install its dependencies and [test] extra at the lower bounds, then the wheel itself, NOT editable,
# over whatever an earlier run installed.
wheel-lowest: $(STAMP_LOWEST)
	rm -rf build $(WHEELHOUSE)
	$(VENV_LOWEST)/bin/python -m pip wheel -q --no-deps -w $(WHEELHOUSE) .
	rm -rf build
	$(VENV_LOWEST)/bin/python -m pip install -q -c ci/constraints-lowest.txt "$$(ls $(WHEELHOUSE)/qlora_trainer-*.whl)[test]"
	$(VENV_LOWEST)/bin/python -m pip install -q --no-deps --force-reinstall $(WHEELHOUSE)/qlora_trainer-*.whl

install: $(STAMP)

# a new output directory per run: re-running the demo never touches an earlier run's results
DEMO_OUT ?= outputs/demo/$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(BIN)/qlora-trainer train configs/demo.yaml output_dir=$(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|bitsandbytes|accelerate|datasets|peft|safetensors|triton)==' | tr '\n' ' '; echo
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST_CMD)

# ... and simulates a CPU without AVX512 (this one may have AVX512-BF16): see tests/conftest.py.
# Tests import the installed wheel: cwd is kept off sys.path (pytest's console script, importlib
# mode, PYTHONSAFEPATH for the Pythons tests start) and QLORA_TEST_INSTALLED makes
# tests/test_packaging.py check that `qlora_trainer` comes from site-packages. An installed package
# cannot find ../shared/data from its own location: QLORA_DATA names it.
test-lowest: wheel-lowest
	$(VENV_LOWEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|bitsandbytes|accelerate|datasets|peft|safetensors|triton|numpy|qlora.trainer)==' | tr '\n' ' '; echo
	ATEN_CPU_CAPABILITY=avx2 QLORA_SIMULATE_CPU=avx2 QLORA_TEST_INSTALLED=1 PYTHONSAFEPATH=1 \
		QLORA_DATA=$${QLORA_DATA:-$(abspath ../shared/data)} \
		PATH=$(abspath $(VENV_LOWEST)/bin):$$PATH $(PYTEST_CMD) $(LOWEST_TESTS)

clean:
	rm -rf $(VENV) $(VENV_LOWEST) outputs
