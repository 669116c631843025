"""The dependency ranges CI tests at both ends: ci/constraints-lowest.txt pins every lower bound of
pyproject.toml, and the newest leg's torch (ci/torch-newest.txt) lies inside torch's range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def _pins(name: str) -> dict[str, Version]:
    text = (ROOT / "ci" / name).read_text()
    return {m[1].lower(): Version(m[2]) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([0-9.]+)", text, re.M)}


def test_lowest_pins_are_the_lower_bounds():
    reqs, pins = _requirements(), _pins("constraints-lowest.txt")
    for name, req in reqs.items():
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lower and name in pins:
            assert pins[name] == lower[0], f"{name}: ci/constraints-lowest.txt pins {pins[name]}, pyproject says >={lower[0]}"
    assert {"torch", "transformers", "peft", "triton"} <= set(pins)


def test_newest_torch_is_inside_the_range():
    torch_req, newest = _requirements()["torch"], _pins("torch-newest.txt")["torch"]
    assert torch_req.specifier.contains(newest), f"ci/torch-newest.txt: torch {newest} is outside {torch_req.specifier}"
