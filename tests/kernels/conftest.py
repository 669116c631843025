"""The ``device`` fixture of the kernel tests: every check runs on the CPU under the Triton
interpreter (``TRITON_INTERPRET=1``, the default of tests/conftest.py) and, ``gpu``-marked, on CUDA
with the kernels compiled (``TRITON_INTERPRET=0``; ``python -m benchmarks.suite`` runs them so).

Triton decides between interpreter and compiler when a kernel module is imported, so one pytest
process runs one of the two: the other parametrisation is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if interpreter_on():
            pytest.skip("TRITON_INTERPRET=1: CUDA runs need the compiled kernels (set TRITON_INTERPRET=0)")
    elif not interpreter_on():
        pytest.skip("Triton kernels run on CPU tensors under TRITON_INTERPRET=1 only")
    return torch.device(request.param)


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids on either device: ``float32`` / ``bfloat16`` rather than ``dtype0`` / ``dtype1``."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None
