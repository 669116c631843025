"""kernels/ is ``qlora_trainer.kernels``; from the repo root (where ``sys.path`` holds ``.``) a bare
``import kernels`` must not impersonate the Hugging Face ``kernels`` package that transformers and
bitsandbytes probe for (issue 13): it hands the name to that package where it is installed (transformers
>= 5.25 requires it), and is inert otherwise."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _hf_kernels_installed() -> bool:
    try:
        md.version("kernels")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(bool(os.environ.get("QLORA_TEST_INSTALLED")),
                    reason="the installed-wheel leg keeps the repo root off sys.path (PYTHONSAFEPATH)")
def test_bare_kernels_is_inert_from_the_repo_root():
    if _hf_kernels_installed():  # theirs takes the name: transformers' model code imports from it
        check = (
            "import transformers.modeling_utils\n"
            "from kernels import get_kernel\n"
            f"assert not kernels.__file__.startswith({str(REPO / 'kernels')!r}), kernels.__file__\n"
        )
    else:
        check = (
            "assert not iu.is_kernels_available(), 'transformers believes HF kernels is installed'\n"
            "try:\n"
            "    from kernels import get_kernel\n"
            "except ImportError as e:\n"
            "    assert 'qlora_trainer.kernels' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('imported get_kernel from our folder')\n"
        )
    code = (
        "import transformers.utils.import_utils as iu, kernels, bitsandbytes\n"
        + check +
        "import qlora_trainer.kernels as k\n"
        "assert k.__name__ == 'qlora_trainer.kernels' and callable(k.lora_matmul)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
