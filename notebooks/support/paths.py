"""Where the notebooks cache their pretrained model and save their figures.

``$QLORA_CACHE`` (default ``<repo>/.cache``, gitignored) holds the pretrained small model so that the
first notebook that needs it trains it and later ones load it. Figures go to ``$QLORA_FIGURES``
(default ``<cache>/figures``). The real data sets come from ``$QLORA_DATA`` (default: the ``shared/data``
beside this checkout, wherever the notebook runs from).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """``$QLORA_DATA`` or ``<repo>/../shared/data`` (the notebooks run from ``notebooks/``, so the
    library's default, ``../shared/data`` from the working directory, would miss it)."""
    env = os.environ.get("QLORA_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def cache_dir() -> Path:
    """``$QLORA_CACHE`` or ``<repo>/.cache``; created on first use."""
    env = os.environ.get("QLORA_CACHE")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def figure_dir() -> Path:
    """``$QLORA_FIGURES`` or ``<cache>/figures``; created on first use."""
    env = os.environ.get("QLORA_FIGURES")
    path = Path(env) if env else cache_dir() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure as ``<figure_dir>/<name>.png`` (atomically) and return the path."""
    import io

    from qlora_trainer.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path = figure_dir() / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
