"""Which parts a GPU call runs: the most valuable ones the committed results have not measured yet.

A GPU is lent for minutes at a time, so the suite's table is filled by several short calls. Each call
reads the suite JSON files committed under ``benchmarks/results/`` (:func:`measured_parts`: parts that
ended ``done`` on a GPU, not in a dry run) and :func:`next_parts` picks, in order of value, the
parts not measured yet whose planned seconds fit the budget. When every part has been measured, the
next call starts over from the first (a new measurement of everything, in the same order).

stdlib only (the suite's parent process imports this before anything is staged).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measured_parts(results_dir: str | Path = RESULTS) -> dict[str, str]:
    """part -> the file that measured it, over every suite JSON in ``results_dir`` (GPU runs only:
    ``suite.dry_run`` false and the part's status ``done``); unreadable files are ignored."""
    found: dict[str, str] = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        suite = doc.get("suite") if isinstance(doc, dict) else None
        if not isinstance(suite, dict) or suite.get("dry_run", True):
            continue
        for p in suite.get("parts", []):
            if isinstance(p, dict) and p.get("status") == "done":
                found.setdefault(str(p.get("part")), f.name)
    return found


def next_parts(plan: list[tuple[str, float]], measured: set[str] | dict[str, str], budget_s: float) -> list[str]:
    """Parts of ``plan`` ((name, planned seconds) in order of value) not in ``measured``, in that
    order, each taken while its seconds still fit ``budget_s`` (a part that does not fit is passed
    over for a smaller later one); at least the first. All measured: start over from the top."""
    todo = [(n, s) for n, s in plan if n not in measured] or list(plan)
    chosen, used = [], 0.0
    for name, secs in todo:
        if used + secs <= budget_s or not chosen:
            chosen.append(name)
            used += secs
    return chosen
