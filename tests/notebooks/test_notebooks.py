"""Execute the research notebooks headless (nbclient) in order, as CI does.

``quantization`` runs first and pretrains the small model into a per-session cache; the later
notebooks load it from there. Each must finish without a cell error, show its figures in the
outputs, and save them under ``$QLORA_FIGURES``. Nothing is written into the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

# (notebook, figures it saves) in execution order: the first one fills the model cache.
ORDER = [
    ("quantization", ["quantization-pretraining", "quantization-error"]),
    ("qlora-vs-lora", ["qlora-vs-lora"]),
    ("rank-and-targets", ["rank-and-targets", "lora-variants"]),
    ("memory", ["memory-breakdown", "memory-paper"]),
    ("combining-adapters", ["combining-adapters"]),
]


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Session cache + figure dirs, exported to the kernels through the environment."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("notebooks")
    mp.setenv("QLORA_CACHE", str(root / "cache"))
    mp.setenv("QLORA_FIGURES", str(root / "figures"))
    mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    yield root
    mp.undo()


def _run(name: str):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


@pytest.mark.notebooks
@pytest.mark.timeout(1500)  # CI budget is ~6 min for all four on 2 idle cores; shared machines run slower
@pytest.mark.parametrize("name,figures", ORDER, ids=[n for n, _ in ORDER])
def test_notebook_executes_and_saves_figures(name, figures, notebook_env):
    nb = _run(name)  # raises CellExecutionError (with the traceback) if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(figures), f"{name}: {len(images)} figures shown, expected {len(figures)}"
    for fig in figures:
        path = notebook_env / "figures" / f"{fig}.png"
        assert path.is_file() and path.stat().st_size > 1000, path
    last = nb.cells[-1]
    assert last.cell_type == "code" and "assert" in last.source     # each notebook ends in asserted claims
