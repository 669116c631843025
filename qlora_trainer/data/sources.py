"""Where records come from: local files and directories, hub datasets, ``builtin:demo``.

Everything goes through ``datasets`` (``load_dataset`` for files, directories and hub names). When the
fast loader fails on a bad file, :func:`_diagnose` re-reads it line by line so the user gets one line
naming the file, the line and the problem instead of a pyarrow traceback.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_trainer.errors import DataError
from qlora_trainer.io import read_text
from qlora_trainer.runtime import expand_path
from qlora_trainer.data.builtin_pairs import BUILTIN_PAIRS, builtin_pairs
from qlora_trainer.data.demo import demo_dataset

if TYPE_CHECKING:
    from datasets import Dataset

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
log = logging.getLogger(__name__)

FIX_ENCODING = "re-encode the file as UTF-8"


def load_records(path: str, *, split: str = "train", key: str = "data.path") -> "Dataset":
    """Load ``path`` as a ``datasets.Dataset`` of raw records (one row per record).

    ``.txt`` files become one row per file with a ``text`` column (the text format chunks them).
    Raises DataError (one line) for a missing file, a corrupt line, an empty dataset or an
    unreachable hub dataset.
    """
    if path.startswith("builtin:"):
        if path in BUILTIN_PAIRS:  # preference pairs (data.format: preference)
            return builtin_pairs(path)
        if path != "builtin:demo":
            raise DataError(f"{key}: unknown built-in dataset {path!r}; one of 'builtin:demo', "
                            f"{', '.join(repr(b) for b in BUILTIN_PAIRS)}")
        return demo_dataset()
    p = Path(expand_path(path))
    if p.is_file():
        ds = _load_file(p)
    elif p.is_dir():
        ds = _load_dir(p, split)
    elif _HUB_NAME.match(path) and Path(path).suffix.lower() not in EXTENSIONS:
        ds = _load_hub(path, split)
    else:
        raise DataError(f"{p}: data file not found ({key}; $QLORA_DATA = {expand_path('$QLORA_DATA')})")
    if len(ds) == 0:
        raise DataError(f"{p if p.exists() else path}: dataset is empty (split {split!r})")
    return ds


def _load_file(p: Path) -> "Dataset":
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    return _load_files(kind, [p])


def _load_files(kind: str, files: list[Path]) -> "Dataset":
    """Files of one loader ``kind`` as one Dataset, each checked first (file:line errors)."""
    import datasets

    texts = []
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        if kind == "parquet":
            continue
        text = read_text(p, FIX_ENCODING, DataError)
        if not text.strip():
            raise DataError(f"{p}: holds only blank lines, no records; add data or point data.path elsewhere")
        if kind == "json":
            _diagnose_json(p)  # cheap, exact line numbers; pyarrow's errors name none
        elif kind == "csv":
            _diagnose_csv(p, text)
        texts.append(text)
    if kind == "text":
        return datasets.Dataset.from_dict({"text": texts})
    try:
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} {kind} files)"
        raise DataError(f"{where}: could not read as {kind}: {_first_line(e)}") from None
    return ds


def _dir_files(p: Path, split: str) -> tuple[str, list[Path]]:
    """The data files of ``split`` in directory ``p`` (datasets' split naming: ``train*.jsonl``,
    ``test.csv``, ...; all files when none is named for a split) and their one loader kind. Files of
    unsupported types (README.md, LICENSE) are ignored; several kinds at once are refused."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p))
    except Exception:  # noqa: BLE001 - no data files at all
        found = {}
    if split not in found:
        names = ", ".join(map(str, found)) or "none"
        raise DataError(f"{p}: no data files for split {split!r} (splits found: {names}); set data.split or "
                        f"name files like {split}.jsonl")
    files = sorted(Path(f) for f in found[split] if Path(f).suffix.lower() in EXTENSIONS)
    in_splits = {Path(f) for fs in found.values() for f in fs}
    stray = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                   and not any(part.startswith(".") for part in f.relative_to(p).parts) and f not in in_splits)
    if stray:
        raise DataError(f"{p}: {', '.join(f.name for f in stray[:3])} belong to no split while other files are "
                        f"named for one ({', '.join(map(str, found))}); rename them (e.g. {split}-2{stray[0].suffix}) "
                        f"or move them out")
    kinds: dict[str, list[Path]] = {}
    for f in files:
        kinds.setdefault(EXTENSIONS[f.suffix.lower()], []).append(f)
    if not kinds:
        raise DataError(f"{p}: no data files ({', '.join(EXTENSIONS)}) for split {split!r}")
    if len(kinds) > 1:
        counts = "; ".join(f"{len(v)} {k} ({', '.join(f.name for f in v[:3])})" for k, v in kinds.items())
        raise DataError(f"{p}: mixes data file types ({counts}); a directory must hold one type: move the "
                        f"others out or point data.path at one file")
    kind, used = next(iter(kinds.items()))
    log.info("data: %s split %r: %d %s file(s): %s", p, split, len(used), kind, ", ".join(f.name for f in used))
    return kind, used


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
        kind, files = _dir_files(p, split)
        return _load_files(kind, files)
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
    text = read_text(p, FIX_ENCODING, DataError)
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


def _diagnose_csv(p: Path, text: str) -> None:
    """Every CSV row must have the header's number of fields (pyarrow names no line)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        for row in reader:
            if row and len(row) != len(header or []):
                raise DataError(f"{p}:{reader.line_num}: row has {len(row)} fields, the header {len(header or [])}; "
                                f"quote values that contain commas (\"a, b\") or fix the row")
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: invalid CSV ({e})") from None


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
