"""Files a user gave us and files we write for them.

Writes are atomic (written aside, renamed into place): nothing a user made is overwritten or left
half-written. Reads are checked (``read_*``): a missing, cut-short or malformed file is one line naming
the file, what is wrong and what to do. A command's output never overlaps its inputs and replaces
only what our commands wrote (``check_output``, ``mark_output`` for directories; ``check_output_file``
for single files, with the command's own test of what it wrote)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qlora_trainer.errors import DiskFullError, QloraError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` (for writers that open their own file: GGUF, CUDA
    snapshots); on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is untouched: an existing file keeps
    its old content, a new one never appears half-written. A full disk or an unwritable place is one
    line naming ``path`` (:func:`write_failure`)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        yield Path(tmp)
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


# ---------------------------------------------------------------------------------------------------
# Checked reads: every file we read from a user's directory (adapters, configs, tokenizer files,
# checkpoints, data) goes through these. A missing, truncated or malformed file is one QloraError line:
# the file, what is wrong with it, and ``fix`` (what to do: copy it again, re-train, resume from an
# earlier checkpoint). A file cut short by an interrupted copy or a full disk is the usual cause.

FIX_ADAPTER = "copy the adapter directory again (an interrupted copy or a full disk cuts files short) or re-train it"
FIX_CHECKPOINT = ("resume from an earlier checkpoint (resume=auto skips damaged ones; or resume=PATH/step-N) or "
                  "start over with output.overwrite=true")
FIX_COPY = "copy the file again or fix it"


def damaged(path: Path, what: str, fix: str, error: "type[Exception] | None" = None) -> Exception:
    """The one-line error ``PATH: WHAT; FIX`` (``error`` default QloraError)."""
    return (error or QloraError)(f"{path}: {what}; {fix}")


def read_bytes(path: Path, fix: str = FIX_COPY, error: "type[Exception] | None" = None) -> bytes:
    """The bytes of ``path``; a missing or unreadable file is one line."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, "file not found", fix, error) from None
    except IsADirectoryError:
        raise damaged(path, "is a directory, not a file", fix, error) from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror or e})", fix, error) from None


def read_text(path: Path, fix: str = FIX_COPY, error: "type[Exception] | None" = None, *,
              whole_lines: bool = False) -> str:
    """UTF-8 text of ``path`` (one line naming the line of the first bad byte otherwise). With
    ``whole_lines`` (files we wrote ourselves, which always end in a newline) a file whose last line
    has no newline is reported as cut short."""
    path = Path(path)
    raw = read_bytes(path, fix, error)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise damaged(Path(f"{path}:{line}"), f"not valid UTF-8 (byte {e.start})", fix, error) from None
    if whole_lines and text and not text.endswith("\n"):
        raise damaged(path, f"is cut short (its last line, {text.count(chr(10)) + 1}, is incomplete)", fix, error)
    return text


def read_json_object(path: Path, error: "type[Exception] | None" = None, fix: str = FIX_COPY) -> dict:
    """Parse a JSON file whose top level must be an object; otherwise raise ``error`` (default
    QloraError) with one line naming the file (and line) and ``fix``."""
    import json

    text = read_text(path, fix, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        end = " (the file ends early: cut short?)" if e.pos >= len(text.rstrip()) else ""
        raise damaged(path, f"line {e.lineno}: invalid JSON ({e.msg}){end}", fix, error) from None
    if not isinstance(data, dict):
        raise damaged(path, f"top level must be a JSON object, got {type(data).__name__}", fix, error)
    return data


def check_safetensors(path: Path, fix: str = FIX_COPY) -> None:
    """Check a safetensors file's structure without loading it: the 8-byte header length, a JSON
    header, and exactly as many data bytes as its tensors' offsets need (a cut-short file has fewer)."""
    import json

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 <= n <= size - 8 else b""
    except FileNotFoundError:
        raise damaged(path, "file not found", fix) from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror or e})", fix) from None
    if n < 2 or 8 + n > size:
        raise damaged(path, f"not a safetensors file or truncated ({size} bytes)", fix)
    try:
        meta = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise damaged(path, "corrupt safetensors header", fix) from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise damaged(path, f"truncated ({size} of {need} bytes)", fix)
    if size > need:
        raise damaged(path, f"{size - need} bytes after its last tensor (damaged)", fix)


def read_safetensors(path: Path, fix: str = FIX_COPY) -> "dict[str, Any]":
    """All tensors of a safetensors file (CPU), structure checked first (:func:`check_safetensors`)."""
    from safetensors.torch import load_file

    check_safetensors(path, fix)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' errors (SafetensorError) become one line
        raise damaged(Path(path), f"cannot be read as safetensors ({first_line(e)})", fix) from None


def read_torch(path: Path, fix: str = FIX_COPY) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a damaged file is one line."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise damaged(path, "file not found", fix)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise damaged(path, f"cannot be loaded ({first_line(e)})", fix) from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------
# Outputs of commands (merge, combine, eval, export, generate, memory, memory-table): never over an input,
# never over what is not ours.

OUTPUT_MARKER = ".qlora-trainer-output"


def check_output(out: Path, inputs: "list[Path | str]", *, overwrite: bool, option: str = "--output",
                 files: "tuple[str, ...] | None" = None) -> None:
    """Refuse (one line) an output directory ``out`` that is, contains or lies inside one of ``inputs``,
    or that would replace what our own commands did not write.

    ``files=None`` (merge, combine, export): the command replaces ``out`` as a whole, so an existing
    ``out`` needs ``overwrite`` and must be a directory holding :data:`OUTPUT_MARKER` (an empty one is
    fine too), never a user's file or a foreign directory. ``files`` (eval): the command writes these
    names into a directory; an existing one is fine unless it holds one of them without our marker.
    Single-file outputs: :func:`check_output_file`."""

    out = Path(out)
    if not _present(out, inputs, option, directory=True):
        return
    ours = (out / OUTPUT_MARKER).is_file()
    if files is not None:
        clash = [n for n in files if (out / n).exists()]
        if clash and not ours:
            raise QloraError(f"{option}: {out} holds {clash[0]}, not written by qlora-trainer (no {OUTPUT_MARKER}); "
                             f"choose another {option} or move that file away")
        return
    if not overwrite:
        raise _exists(out, option)
    if not ours and any(out.iterdir()):
        raise QloraError(f"{option}: {out} was not written by qlora-trainer (no {OUTPUT_MARKER}); --overwrite "
                         f"replaces only our own outputs: choose another {option} or remove it yourself")


def check_output_file(out: Path, inputs: "list[Path | str]", *, overwrite: bool, ours: Callable[[Path], bool],
                      what: str, option: str = "--output") -> None:
    """Refuse (one line) a single-file output ``out`` that is or lies inside one of ``inputs``, or that
    would replace a file our command did not write.

    A new ``out`` is fine. An existing one is replaced only with ``overwrite`` and only when
    ``ours(out)`` says our command wrote it (GGUF's magic bytes, our JSONL's fields, our chart's
    creator tag; an empty file counts as ours, a file that cannot be read does not). ``what`` names
    such a file in the error ("a GGUF file"). Links and directories are never replaced. Write it with
    :func:`atomic_write_bytes` or :func:`atomic_file`."""
    out = Path(out)
    if not _present(out, inputs, option, directory=False):
        return
    if not overwrite:
        raise _exists(out, option)
    try:
        mine = out.stat().st_size == 0 or bool(ours(out))
    except (OSError, ValueError):
        mine = False
    if not mine:
        raise QloraError(f"{option}: {out} is not {what}; --overwrite replaces only an earlier output of "
                         f"qlora-trainer: choose another path (nothing of yours is replaced)")


def starts_with(magic: bytes, *tags: bytes) -> Callable[[Path], bool]:
    """An ``ours`` check for :func:`check_output_file`: the file starts with ``magic`` and holds every
    one of ``tags`` (e.g. a creator string we wrote into its metadata)."""

    def check(path: Path) -> bool:
        with open(path, "rb") as f:
            if f.read(len(magic)) != magic:
                return False
            data = f.read() if tags else b""
        return all(t in data for t in tags)

    return check


def check_apart(out: Path, inputs: "list[Path | str]", option: str = "--output") -> None:
    """Refuse (one line) an output that is, contains or lies inside one of ``inputs``."""
    target = Path(out).resolve()
    for given in inputs:
        src = Path(given).resolve()
        how = ("is" if target == src else "lies inside" if src in target.parents else
               "contains" if target in src.parents else None)
        if how is not None:
            raise QloraError(f"{option}: {out} {how} the input {given}; writing there would destroy what is being "
                             f"read: choose an output outside the inputs")


def _present(out: Path, inputs: "list[Path | str]", option: str, *, directory: bool) -> bool:
    """Whether an output of the expected kind (a directory, else a regular file) is already at ``out``;
    refuse (one line) one that overlaps ``inputs`` or is a link or of the other kind."""
    check_apart(out, inputs, option)
    if not (out.exists() or out.is_symlink()):
        return False
    if out.is_symlink() or not (out.is_dir() if directory else out.is_file()):
        what = ("a link" if out.is_symlink() else "a file" if out.is_file() else "a directory" if out.is_dir()
                else "a special file")
        raise QloraError(f"{option}: {out} is {what}, not an output of qlora-trainer; choose another path "
                         f"(nothing of yours is replaced)")
    return True


def _exists(out: Path, option: str) -> QloraError:
    return QloraError(f"{option}: {out} already exists; pass --overwrite to replace it, or choose another path")


def mark_output(directory: Path, command: str) -> None:
    """Mark ``directory`` as an output of our ``command`` (what ``--overwrite`` may replace later)."""
    atomic_write_text(Path(directory) / OUTPUT_MARKER, f"written by qlora-trainer {command}\n")
