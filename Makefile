# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The lowest supported versions (ci/constraints-lowest.txt) get a venv of their own; CI runs both.
VENV_LOWEST ?= .venv-lowest
STAMP_LOWEST := $(VENV_LOWEST)/.installed
PYTEST_CMD = TRITON_INTERPRET=1 pytest -m "not gpu and not slow" $(PYTEST_ARGS)

.PHONY: demo test test-lowest install clean

# Tiny CPU models: one OpenMP thread per process. With more, small matmuls spend their time
# synchronising threads (measured on the 2-core box: demo 104 s with the default, 18 s with 1).
export OMP_NUM_THREADS ?= 1

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: takes the CPU build on disk instead of resolving a multi-GB CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

$(STAMP_LOWEST): pyproject.toml ci/constraints-lowest.txt
	test -x $(VENV_LOWEST)/bin/python || $(PY) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LOWEST)/bin/python -m pip install -q "torch==2.13.0"
	$(VENV_LOWEST)/bin/python -m pip install -q -c ci/constraints-lowest.txt -e ".[test]"
	touch $(STAMP_LOWEST)

install: $(STAMP)

# a new output directory per run: re-running the demo never touches an earlier run's results
DEMO_OUT ?= outputs/demo/$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(BIN)/qlora-trainer train configs/demo.yaml output_dir=$(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|bitsandbytes|accelerate|datasets|peft|safetensors|triton)==' | tr '\n' ' '; echo
	PATH=$(abspath $(BIN)):$$PATH $(PYTEST_CMD)

# ... and simulates a CPU without AVX512 (this one may have AVX512-BF16): see tests/conftest.py
test-lowest: $(STAMP_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|bitsandbytes|accelerate|datasets|peft|safetensors|triton|numpy)==' | tr '\n' ' '; echo
	ATEN_CPU_CAPABILITY=avx2 QLORA_SIMULATE_CPU=avx2 PATH=$(abspath $(VENV_LOWEST)/bin):$$PATH $(PYTEST_CMD)

clean:
	rm -rf $(VENV) $(VENV_LOWEST) outputs
