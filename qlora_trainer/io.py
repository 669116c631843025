"""Atomic file and directory writes: nothing a user made is overwritten or left half-written."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qlora_trainer.errors import DiskFullError, QloraError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = write_failure(e, path)  # decided before the clean-up frees the space
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_directory(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is untouched. With
    ``replace=False`` an existing ``path`` is an error (FileExistsError).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not replace:
            raise FileExistsError(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        full = write_failure(e, path)  # decided before the clean-up frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


# Messages of writers that drop the errno: safetensors (Rust io::Error text), torch.save's zip writer.
_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "code: 28,")
_VAGUE_TEXT = ("file write failed", "unexpected pos")
_LOW_SPACE = 16 * 2**20  # bytes free below which a vague write failure is taken for a full disk


_PLACE = (errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR)


def write_failure(e: BaseException, path: Path) -> "Exception | None":
    """The one-line error for ``e`` raised while writing ``path``, or None for anything else.

    :class:`DiskFullError` when the write ran out of space (an ENOSPC/EDQUOT OSError, a writer's
    message saying so, or a vague write failure while the filesystem is nearly full); a QloraError
    when the place cannot hold the file (inside a file, no permission, read-only filesystem). A
    DiskFullError from a nested write is re-labelled with ``path`` (the user's target, not our
    temporary)."""
    if isinstance(e, DiskFullError):
        return DiskFullError(path)
    if not isinstance(e, Exception) or isinstance(e, QloraError):
        return None
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR):
        return QloraError(f"cannot write {path}: {e.filename} is in the way (a file, not a directory); "
                          f"choose another path")
    if isinstance(e, OSError) and e.errno in _PLACE:
        return QloraError(f"cannot write {path}: {e.strerror} ({e.filename}); choose another path")
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(t in text for t in _FULL_TEXT)
    if not full and any(t in text for t in _VAGUE_TEXT):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(_existing_parent(path)).free < _LOW_SPACE
    return DiskFullError(path) if full else None


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a full disk (or an unwritable place) during the block into one line naming ``path``."""
    try:
        yield
    except Exception as e:
        full = write_failure(e, path)
        if full is not None:
            raise full from None
        raise


def read_json_object(path: Path, error: type[Exception] | None = None) -> dict:
    """Parse a JSON file whose top level must be an object; otherwise raise ``error`` (default
    QloraError) with one line naming the file (and line)."""
    import json

    error = error or QloraError
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data
