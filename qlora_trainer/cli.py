"""``qlora-trainer`` command line: one subcommand per module in ``qlora_trainer.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from qlora_trainer import __version__
from qlora_trainer.errors import QloraError

COMMANDS: dict[str, str] = {
    "train": "qlora_trainer.commands.train",
    "generate": "qlora_trainer.commands.generate",
    "eval": "qlora_trainer.commands.eval",
    "merge": "qlora_trainer.commands.merge",
    "combine": "qlora_trainer.commands.combine",
    "export": "qlora_trainer.commands.export",
    "data-check": "qlora_trainer.commands.data_check",
    "memory": "qlora_trainer.commands.memory",
    "memory-table": "qlora_trainer.commands.memory_table",
    "doctor": "qlora_trainer.commands.doctor",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qlora-trainer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, modname in COMMANDS.items():
        if wanted == name:  # import only the command that runs
            mod = importlib.import_module(modname)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            sub.add_parser(name, help=_help_line(modname))
    return parser


def _help_line(modname: str) -> str:
    """A command's ``HELP`` read from its source, not imported: ``--help`` never loads torch."""
    spec = importlib.util.find_spec(modname)
    if spec is None or not spec.origin:
        return "(not available)"
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets):
            return ast.literal_eval(node.value)
    return "(not available)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        with _sigterm_as_interrupt():
            return int(args._run(args) or 0)
    except QloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (loading, data checks): unwinds like Ctrl-C, then exits 143."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`_Terminated` (train's loop installs its own handler,
    which saves a checkpoint first). A handler someone else installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
