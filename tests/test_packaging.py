"""The built wheel holds the whole source tree: every module and data file of ``qlora_trainer/`` and
of the repo-root ``kernels/`` (installed as ``qlora_trainer.kernels``, never a top-level ``kernels``).

A non-editable install (``pip install .``, a git URL, a staged wheel) gets exactly the wheel, so a
subpackage the packaging misses is a ``ModuleNotFoundError`` on a user's machine and nowhere in an
editable checkout. The wheel is built from a copy of the sources (the checkout stays clean).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> where its files land in the wheel
SOURCES = {"qlora_trainer": "qlora_trainer", "kernels": "qlora_trainer/kernels"}
_SKIP = ("__pycache__", ".ipynb_checkpoints")


def _source_files() -> dict[str, Path]:
    """Wheel path -> source file, for every file of the package trees (compiled files excluded)."""
    files = {}
    for src, dest in SOURCES.items():
        for path in sorted((ROOT / src).rglob("*")):
            rel = path.relative_to(ROOT / src)
            if path.is_dir() or any(part in _SKIP or part.startswith(".") for part in rel.parts):
                continue
            if path.suffix in (".pyc", ".pyo"):
                continue
            files[f"{dest}/{rel.as_posix()}"] = path
    return files


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """Names inside the wheel pip builds from a copy of the project (pyproject's build backend)."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("no source checkout beside the tests")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns(*_SKIP, "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", *SOURCES):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / name)
    out = work / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (wheel,) = out.glob("qlora_trainer-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_holds_every_module_of_the_source_tree(wheel_names):
    missing = sorted(name for name in _source_files() if name.endswith(".py") and name not in wheel_names)
    assert not missing, f"{len(missing)} modules missing from the wheel, e.g. {missing[:8]}"


def test_wheel_holds_the_package_data(wheel_names):
    data = [name for name in _source_files() if not name.endswith(".py")]
    assert "qlora_trainer/py.typed" in data
    missing = sorted(name for name in data if name not in wheel_names)
    assert not missing, f"package data missing from the wheel: {missing}"


def test_wheel_installs_kernels_only_inside_the_package(wheel_names):
    tops = {name.split("/", 1)[0] for name in wheel_names}
    assert "kernels" not in tops  # transformers probes for the Hugging Face `kernels` package by that name
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"qlora_trainer"}
    assert "qlora_trainer/kernels/__init__.py" in wheel_names


@pytest.mark.skipif(not os.environ.get("QLORA_TEST_INSTALLED"), reason="only where the wheel is installed")
def test_the_suite_imports_the_installed_wheel_not_the_checkout():
    """`make test-lowest` installs the built wheel (not editable) and sets QLORA_TEST_INSTALLED: the
    package, its kernels and a Python started from the repo root all resolve to site-packages."""
    import qlora_trainer
    import qlora_trainer.kernels

    checkout = [ROOT / folder for folder in SOURCES]
    for mod in (qlora_trainer, qlora_trainer.kernels):
        path = Path(mod.__file__).resolve()
        assert "site-packages" in path.parts and not any(c in path.parents for c in checkout), path
    code = "import qlora_trainer.kernels as k; print(k.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "site-packages" in run.stdout, run.stderr[-2000:]
