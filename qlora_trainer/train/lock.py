"""One run per ``output_dir``: a lock file holding the owner's process id and host.

``output_dir/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic: of two runs starting together exactly
one creates it) and removed when the run ends, however it ends (return, exception, Ctrl-C, SIGTERM: all
unwind through :func:`output_lock`). A second run on the same directory is refused with one line naming
the owner. A lock whose process is gone (same host, no such pid: a ``kill -9``, a power cut) is stale:
taken over with a warning. A lock from another host (a shared filesystem) cannot be checked: refused,
naming the file to delete if that run is gone. Under ``accelerate launch`` only rank 0 takes it (every
rank of one launch writes the same run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from qlora_trainer.errors import QloraError
from qlora_trainer.train.guards import check_output_location

log = logging.getLogger(__name__)

LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(path: Path) -> dict | None:
    """The lock's ``{"pid", "host"}``, or None when it is gone or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _create(path: Path) -> bool:
    """Create the lock file holding our pid and host; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(out: Path) -> Path:
    """Take ``out/.lock`` (``out`` must exist) or raise the one-line refusal; returns the lock path."""
    path = Path(out) / LOCK
    for _ in range(3):  # a stale lock removed by us (or by a racing run) is retried
        if _create(path):
            return path
        owner, host = _owner(path), socket.gethostname()
        if owner is None:
            if not path.exists():
                continue
            raise QloraError(f"output_dir: {str(out)!r} is locked by {path}, which is unreadable; if no run is "
                             f"using this directory, delete {path} and run again")
        if owner.get("host") == host and not _pid_alive(owner["pid"]):
            log.warning("output_dir %s: taking over the lock of process %d, which is gone (a run killed "
                        "earlier)", out, owner["pid"])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        where = "this machine" if owner.get("host") == host else f"host {owner.get('host')}"
        raise QloraError(f"output_dir: {str(out)!r} is in use by another run (process {owner['pid']} on "
                         f"{where}); wait for it to finish or choose another output_dir (if that run is gone, "
                         f"delete {path})")
    raise QloraError(f"output_dir: could not lock {str(out)!r} ({path} keeps reappearing); is another run "
                     f"starting there?")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    owner = _owner(path)
    if owner is not None and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_lock(out: str | Path, *, enabled: bool | None = None) -> Iterator[None]:
    """Hold ``out/.lock`` for the block. ``enabled`` defaults to "this is rank 0 of the launch"
    (``RANK`` unset or 0). The output location is checked (and created) first."""

    if enabled is None:
        enabled = int(os.environ.get("RANK", "0")) == 0
    if not enabled:
        yield
        return
    out = Path(out)
    check_output_location(out)  # a file in the way, not writable: its own one-line error
    path = acquire(out)
    try:
        yield
    finally:
        release(path)
