"""The package's floors, read from its imports (an AST scan of every ``import`` in ``qlora_trainer/`` and
``kernels/``, function-local ones included; imports under ``if TYPE_CHECKING:`` are exempt).

A module imports only from its own floor or below::

    apps      commands, cli, doctor
    recipes   train
    analysis  memory, evaluate
    library   data, models, lora, export
    kernels   kernels (installed as qlora_trainer.kernels)
    config    config, config_sections
    ground    errors, io, runtime, targets

Within one floor imports are allowed as long as they form no cycle. A function-local import is for
heavy or optional third-party packages only (triton, bitsandbytes, datasets, ...), never for one of our
own modules: a cycle hidden inside a function is still a cycle. A second test keeps the modules that
need no torch (the config, its errors, the estimator's arithmetic, ...) free of it, so ``--help`` and
``memory`` stay fast and importable without the heavy stack.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FLOORS = {
    "errors": 0, "io": 0, "runtime": 0, "targets": 0,
    "config_rules": 0, "config": 1, "config_sections": 1,
    "kernels": 2,
    "data": 3, "models": 3, "lora": 3, "export": 3,
    "memory": 4, "evaluate": 4,
    "train": 5,
    "commands": 6, "cli": 6, "doctor": 6,
}
FLOOR_NAMES = ["ground", "config", "kernels", "library", "analysis", "recipes", "apps"]

# Modules whose import must never load torch (transitively, through our own modules and packages): the
# config and what it stands on, the catalog of shapes, and the CLI (``--help`` reads each command's HELP
# from its source, so listing the commands loads none of them).
TORCH_FREE = [
    "qlora_trainer.errors",
    "qlora_trainer.io",
    "qlora_trainer.targets",
    "qlora_trainer.config_rules",
    "qlora_trainer.config",
    "qlora_trainer.config_sections",
    "qlora_trainer.models.catalog",
    "qlora_trainer.cli",
]
HEAVY = {"torch", "transformers", "accelerate", "bitsandbytes", "triton", "datasets", "peft", "numpy"}
# A module that imports one of these at its top is how we import that package: a function-local import of
# it (the Triton launchers ``kernels/_triton_*.py``) is a lazy import of the optional package.
OPTIONAL = {"triton"}

@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # one of our modules, or a top-level third-party name
    local: bool  # inside a function body
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["qlora_trainer", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [p for d in ("qlora_trainer", "kernels") for p in (REPO / d).rglob("*.py")]
    return {_module_name(p): p for p in files}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, local: bool):
    """Yield (import node, inside a function) for every import under ``node``, skipping TYPE_CHECKING."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                yield from _walk(sub, local)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inner)


def _own(name: str, modules: dict[str, Path]) -> str | None:
    if name == "kernels" or name.startswith("kernels."):
        name = "qlora_trainer." + name
    return name if name in modules else None


def _packages(mod: str, modules: dict[str, Path]) -> list[str]:
    parts = mod.split(".")
    return [p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p in modules]


def _imports(modules: dict[str, Path]) -> list[Import]:
    found = []
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node, local in _walk(ast.parse(path.read_text(), str(path)), False):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
                names = [f"{base}.{a.name}" if _own(f"{base}.{a.name}", modules) else base for a in node.names]
            targets = {t for t in (_own(n, modules) for n in names) if t and t != mod}
            # importing a.b.c first runs the __init__ of a.b (unless that package is the importer's own)
            targets |= {p for t in set(targets) for p in _packages(t, modules) if not mod.startswith(p + ".")
                        and p != mod and p != "qlora_trainer"}
            if not targets and names[0].split(".")[0] not in ("qlora_trainer", "kernels"):
                targets = {names[0].split(".")[0]}
            found += [Import(mod, t, local, node.lineno) for t in targets]
    return found


def _floor(mod: str) -> int | None:
    parts = mod.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else 0


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, _imports(modules)


def test_every_module_has_a_floor(graph):
    modules, _ = graph
    assert [m for m in modules if _floor(m) is None] == []


def test_no_upward_imports(graph):
    modules, imports = graph
    upward = sorted(
        f"{i.importer}:{i.line} -> {i.target} ({FLOOR_NAMES[_floor(i.importer)]} < {FLOOR_NAMES[_floor(i.target)]})"
        for i in imports
        if i.target in modules and _floor(i.importer) is not None and _floor(i.target) is not None
        and _floor(i.target) > _floor(i.importer)
    )
    assert upward == []


def _wraps_optional(imports: list[Import]) -> set[str]:
    return {i.importer for i in imports if not i.local and i.target in OPTIONAL}


def test_no_function_local_imports_of_our_modules(graph):
    modules, imports = graph
    lazy = _wraps_optional(imports)
    assert "qlora_trainer.kernels._triton_nf4" in lazy
    local = sorted(f"{i.importer}:{i.line} -> {i.target}" for i in imports
                   if i.local and i.target in modules and i.target not in lazy)
    assert local == []


def test_no_import_cycles(graph):
    modules, imports = graph
    edges = defaultdict(set)
    for i in imports:
        if i.target in modules:
            edges[i.importer].add(i.target)
    assert [sorted(c) for c in _cycles(edges)] == []


def _loads_torch(mod: str, modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """The chain of module-level imports from ``mod`` to a heavy package, or [] when there is none."""
    top = defaultdict(set)
    for i in imports:
        if not i.local:
            top[i.importer].add(i.target)
    for m in modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = m.split(".")
        top[m] |= {".".join(parts[:k]) for k in range(1, len(parts))} & modules.keys()
    seen, todo = {mod: [mod]}, [mod]
    while todo:
        m = todo.pop()
        for t in sorted(top[m]):
            if t in HEAVY:
                return [*seen[m], t]
            if t in modules and t not in seen:
                seen[t] = [*seen[m], t]
                todo.append(t)
    return []


@pytest.mark.parametrize("mod", TORCH_FREE)
def test_torch_free_modules_stay_torch_free(graph, mod):
    modules, imports = graph
    assert mod in modules
    assert _loads_torch(mod, modules, imports) == []


def test_help_loads_no_torch():
    code = ("import sys\nfrom qlora_trainer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules, 'qlora-trainer --help imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "(not available)" not in done.stdout
