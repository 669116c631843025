"""Generation tasks: where the examples come from, which fields are prompt and answer, how answers
are extracted.

A task spec (``eval --task`` / ``eval.tasks``) is

* a registered name: ``gsm8k`` (``$QLORA_DATA/gsm8k/test.jsonl``, ``####`` answers) or
  ``gsm8k-train`` (its train split), or any name added with :func:`register_task`;
* a data file (.jsonl/.json/.csv/.parquet) whose records have ``prompt`` (or ``question``) and
  ``answer`` (or ``completion``) fields, optionally followed by ``@<extractor>``
  (``data/qa.jsonl@last_number``; default ``exact``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qlora_trainer.errors import ConfigError, DataError, QloraError
from qlora_trainer.data.sources import load_records, record_line
from qlora_trainer.evaluate.extractors import get_extractor
from qlora_trainer.runtime import expand_path


@dataclass(frozen=True)
class GenerationTask:
    """A set of prompts with reference answers, scored by exact match of extracted answers."""

    name: str
    path: str
    """Data file (``$QLORA_DATA`` expands); read through ``data.sources.load_records``."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    extractor: str = "exact"
    """Name in ``evaluate.extractors.EXTRACTORS``."""
    max_new_tokens: int = 256
    """Default new-token limit for this task (a command-line or config value replaces it)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str


TASKS: dict[str, GenerationTask] = {
    "gsm8k": GenerationTask("gsm8k", "$QLORA_DATA/gsm8k/test.jsonl", "question", "answer", "gsm8k", 256),
    "gsm8k-train": GenerationTask("gsm8k-train", "$QLORA_DATA/gsm8k/train.jsonl", "question", "answer", "gsm8k", 256),
}

_PROMPT_FIELDS, _ANSWER_FIELDS = ("prompt", "question", "instruction"), ("answer", "completion", "output")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def register_task(task: GenerationTask) -> None:
    """Make ``task`` available by its name (replaces an existing one)."""
    TASKS[task.name] = task


def resolve_task(spec: str) -> GenerationTask:
    """A task from its spec (a registered name, or ``FILE[@extractor]``); raises QloraError naming
    the spec and the valid choices."""
    if spec in TASKS:
        return TASKS[spec]
    path, _, extractor = spec.partition("@")
    if Path(path).suffix.lower() not in _DATA_SUFFIXES:
        raise QloraError(f"eval task {spec!r}: not a known task ({', '.join(TASKS)}) nor a data file "
                         f"({'/'.join(_DATA_SUFFIXES)}, optionally FILE@extractor)")
    extractor = extractor or "exact"
    get_extractor(extractor)
    return GenerationTask(Path(path).stem, path, prompt_field="", answer_field="", extractor=extractor)


def load_examples(task: GenerationTask, *, limit: int | None = None) -> tuple[GenerationTask, list[Example]]:
    """The first ``limit`` (all when None) examples of ``task``, and the task with its fields resolved.

    Raises DataError naming the file and, for a bad record, its line."""
    path = expand_path(task.path)
    ds = load_records(path)
    cols = set(ds.column_names)
    prompt_field = task.prompt_field or next((f for f in _PROMPT_FIELDS if f in cols), "")
    answer_field = task.answer_field or next((f for f in _ANSWER_FIELDS if f in cols), "")
    for what, name, options in (("prompt", prompt_field, _PROMPT_FIELDS), ("answer", answer_field, _ANSWER_FIELDS)):
        if not name or name not in cols:
            raise DataError(f"{path}: task {task.name!r} needs a {what} field ({name or ' or '.join(options)}); "
                            f"columns: {', '.join(sorted(cols))}")
    task = replace(task, prompt_field=prompt_field, answer_field=answer_field)
    n = len(ds) if limit is None else min(limit, len(ds))
    rows = ds.select(range(n))
    examples = []
    for i, (p, a) in enumerate(zip(rows[prompt_field], rows[answer_field])):
        if not isinstance(p, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise DataError(f"{record_line(path, i)}: {prompt_field!r} must be a string and {answer_field!r} "
                            f"a string or number")
        examples.append(Example(p, str(a)))
    return task, examples


def check_eval_tasks(specs: list[str], key: str = "eval.tasks") -> None:
    """Every task spec names a task and extractor (checked at preflight, before anything loads)."""
    for spec in specs:
        try:
            resolve_task(spec)
        except QloraError as e:  # an unknown task or extractor
            raise ConfigError(f"{key}: {e}") from None
