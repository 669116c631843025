"""Package discovery for setuptools (everything else is in pyproject.toml).

``qlora_trainer/`` installs as itself and the repo-root ``kernels/`` as ``qlora_trainer.kernels``
(never a top-level ``kernels``: transformers probes for the Hugging Face ``kernels`` package by that
name). Every folder of both trees is found, not listed, with every file in it, so a new subpackage,
module or data file cannot be left out of a wheel; tests/test_packaging.py builds one and checks.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
TREES = {"qlora_trainer": "qlora_trainer", "qlora_trainer.kernels": "kernels"}  # package -> folder
_EXCLUDE = ["__pycache__", "*.__pycache__"]  # (folders named with a dot are never packages)


def _packages(package: str, folder: str) -> dict[str, Path]:
    """``package`` and every folder below ``folder`` as a (sub)package name -> its folder."""
    subs = find_namespace_packages(str(ROOT / folder), exclude=_EXCLUDE)
    found = {package: ROOT / folder}
    found.update({f"{package}.{sub}": ROOT / folder / sub.replace(".", "/") for sub in subs})
    return found


def _data(folder: Path) -> list[str]:
    """The non-Python files directly in ``folder`` (its subfolders are packages of their own)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix not in (".py", ".pyc", ".pyo"))


PACKAGES = {name: path for package, folder in TREES.items() for name, path in _packages(package, folder).items()}

setup(
    package_dir=TREES,
    packages=sorted(PACKAGES),
    package_data={name: files for name, path in PACKAGES.items() if (files := _data(path))},
)
