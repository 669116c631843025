"""Shared fixtures. Tests run with ``--import-mode=importlib`` (repo root off sys.path)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# benchmarks/ and the notebooks' support/ live outside the package: importable by name from the tests
# without putting the repository root (and with it the bare `kernels` folder) on sys.path
_REPO = Path(__file__).resolve().parents[1]
_OUTSIDE = Path(tempfile.mkdtemp(prefix="qlora-tests-path-"))
atexit.register(shutil.rmtree, _OUTSIDE, True)
(_OUTSIDE / "benchmarks").symlink_to(_REPO / "benchmarks", target_is_directory=True)
sys.path += [str(_OUTSIDE), str(_REPO / "notebooks")]

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

if os.environ.get("QLORA_SIMULATE_CPU") == "avx2":
    # `make test-lowest` simulates a CPU without AVX512 (whatever this one has): torch's dispatch (and
    # bitsandbytes' Python checks of it) see AVX2 through ATEN_CPU_CAPABILITY, and bitsandbytes'
    # native AVX512-BF16 probe answers no, so no Linear4bit is created with repacking enabled.
    assert os.environ.get("ATEN_CPU_CAPABILITY") == "avx2", "set ATEN_CPU_CAPABILITY=avx2 before torch loads"
    import bitsandbytes.functional as _bnb_functional
    import bitsandbytes.nn.modules as _bnb_modules

    _bnb_functional.has_avx512bf16 = _bnb_modules.has_avx512bf16 = lambda: False
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer():
    """The built-in byte-level tokenizer (vocab 260, EOS 258, pad 259)."""
    from qlora_trainer.models.tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture
def tiny_model():
    """A random fp32 ``tiny`` Llama (hidden 128, 4 layers, GQA 4/2 heads, vocab 260), 16-bit base."""
    from qlora_trainer.models.tiny import random_model

    return random_model("tiny", seed=0).eval()


@pytest.fixture
def tiny_nf4_model():
    """The same tiny Llama with every linear layer but lm_head in NF4 (double quant), fp32 compute."""
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.models.tiny import random_model

    return quantize_model(random_model("tiny", seed=0), compute_dtype=torch.float32).eval()


@pytest.fixture
def cli_error(capsys):
    """Run ``qlora-trainer ARGS`` in-process and return its error message: asserts the exit status
    (2 by default), exactly one ``error: ...`` line on stderr and no traceback."""
    from qlora_trainer.cli import main

    def run(*argv, code: int = 2) -> str:
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert rc == code, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, err
        return lines[0][len("error: "):]

    return run
