"""``bench``: import access to ``benchmarks`` (not an installed package) without putting the repo root,
and with it our ``kernels/`` folder, on sys.path."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    link_dir = tmp_path / "path"
    link_dir.mkdir()
    (link_dir / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    monkeypatch.syspath_prepend(str(link_dir))
    yield lambda name: importlib.import_module(f"benchmarks.{name}")
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[mod]  # the link dies with tmp_path
