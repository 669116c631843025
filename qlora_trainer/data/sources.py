"""Where records come from: local files and directories, hub datasets, ``builtin:demo``.

Everything goes through ``datasets`` (``load_dataset`` for files, directories and hub names). When the
fast loader fails on a bad file, :func:`_diagnose` re-reads it line by line so the user gets one line
naming the file, the line and the problem instead of a pyarrow traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_trainer.errors import DataError
from qlora_trainer.runtime import expand_path

if TYPE_CHECKING:
    from datasets import Dataset

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_records(path: str, *, split: str = "train") -> "Dataset":
    """Load ``path`` as a ``datasets.Dataset`` of raw records (one row per record).

    ``.txt`` files become one row per file with a ``text`` column (the text format chunks them).
    Raises DataError (one line) for a missing file, a corrupt line, an empty dataset or an
    unreachable hub dataset.
    """
    if path.startswith("builtin:"):
        from qlora_trainer.data.demo import demo_dataset

        if path != "builtin:demo":
            raise DataError(f"data.path: unknown built-in dataset {path!r}; the only one is 'builtin:demo'")
        return demo_dataset()
    p = Path(expand_path(path))
    if p.is_file():
        ds = _load_file(p)
    elif p.is_dir():
        ds = _load_dir(p, split)
    elif _HUB_NAME.match(path) and Path(path).suffix.lower() not in EXTENSIONS:
        ds = _load_hub(path, split)
    else:
        raise DataError(f"{p}: data file not found (data.path; $QLORA_DATA = {expand_path('$QLORA_DATA')})")
    if len(ds) == 0:
        raise DataError(f"{p if p.exists() else path}: dataset is empty (split {split!r})")
    return ds


def _load_file(p: Path) -> "Dataset":
    import datasets

    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if kind == "text":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(p, p.read_bytes(), e) from None
        return datasets.Dataset.from_dict({"text": [text]})
    if kind == "json":
        _diagnose_json(p)  # cheap, exact line numbers; pyarrow's errors name none
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        raise DataError(f"{p}: could not read as {kind}: {_first_line(e)}") from None
    return ds


def _load_dir(p: Path, split: str) -> "Dataset":
    import datasets

    saved = p / "dataset_info.json"
    try:
        if saved.is_file() or (p / "dataset_dict.json").is_file():  # written by save_to_disk
            obj = datasets.load_from_disk(str(p))
            if isinstance(obj, datasets.DatasetDict):
                if split not in obj:
                    raise DataError(f"{p}: no split {split!r} (splits: {', '.join(obj)}); set data.split")
                return obj[split]
            return obj
        return datasets.load_dataset(str(p), split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{p}: could not load dataset directory (split {split!r}): {_first_line(e)}") from None


def _load_hub(name: str, split: str) -> "Dataset":
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{name}: not a local path and could not be loaded from the hub (offline? "
                        f"download it first or point data.path at a file): {_first_line(e)}") from None


def _diagnose_json(p: Path) -> None:
    """Read a .jsonl/.json file line by line; raise DataError at the first undecodable line."""
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(p, raw, e) from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array file
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not all(isinstance(r, dict) for r in obj):
            raise DataError(f"{p}: a .json file must be a list of objects (records)")
        return
    first_type: dict[str, tuple[str, int]] = {}  # key -> (type name, line it was first seen)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: invalid JSON ({e.msg} at column {e.colno}); fix or delete the line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{i}: each line must be a JSON object, got {type(rec).__name__}")
        for k, v in rec.items():
            if v is None:
                continue
            kind = _json_kind(v)
            seen = first_type.setdefault(k, (kind, i))
            if seen[0] != kind:
                raise DataError(f"{p}:{i}: field {k!r} is {kind} here but {seen[0]} on line {seen[1]}; "
                                "use one type per field")


def _not_utf8(p: Path, raw: bytes, e: UnicodeDecodeError) -> DataError:
    """The one-line error for ``raw`` (the bytes of ``p``) failing to decode at ``e.start``."""
    line = raw[: e.start].count(b"\n") + 1
    return DataError(f"{p}:{line}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8")


def _json_kind(v: object) -> str:
    """JSON type name; ints and floats are both numbers (pyarrow widens them)."""
    if isinstance(v, bool):
        return "bool"
    return "number" if isinstance(v, (int, float)) else type(v).__name__


def record_line(path: str, index: int) -> str:
    """``file:line`` of record ``index`` for a jsonl file (blank lines skipped), else ``file record N``."""
    p = Path(expand_path(path))
    if p.is_file() and p.suffix.lower() == ".jsonl":
        n = -1
        with p.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    n += 1
                    if n == index:
                        return f"{p}:{lineno}"
    if p.is_file() and p.suffix.lower() == ".csv":
        return f"{p}:{index + 2}"  # header is line 1 (no multi-line cells assumed)
    return f"{p if p.exists() else path} record {index}"


def split_records(ds: "Dataset", fraction: float, seed: int) -> tuple["Dataset", "Dataset | None"]:
    """Carve ``fraction`` of ``ds`` off as the eval set, reproducibly for ``seed``."""
    if fraction <= 0.0:
        return ds, None
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        raise DataError(f"data.eval_fraction={fraction} leaves no training samples out of {len(ds)}")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
