# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

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

install: $(STAMP)

# a new output directory per run: re-running the demo never touches an earlier run's results
DEMO_OUT ?= outputs/demo/$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(BIN)/qlora-trainer train configs/demo.yaml output_dir=$(DEMO_OUT)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/pytest -m "not gpu and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
