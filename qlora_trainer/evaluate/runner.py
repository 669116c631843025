"""Run generation tasks (and the dataset loss) on a loaded model; write predictions and a summary.

Shared by ``qlora-trainer eval`` and the trainer (``eval.tasks`` every ``eval.every``
steps): both call :func:`run_tasks` on a model in memory, so the in-training numbers are the ones
the command reports for the same checkpoint.

Output (``write_results``): ``predictions.jsonl`` (one line per model x task x example) beside
``summary.json``, both written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qlora_trainer.evaluate.generation import GenerationSettings, format_prompt, generate_texts
from qlora_trainer.evaluate.extractors import score_one
from qlora_trainer.evaluate.tasks import load_examples, resolve_task
from qlora_trainer.io import atomic_write_text

if TYPE_CHECKING:
    from qlora_trainer.config import Config


@dataclass
class TaskResult:
    """One task on one model (``label``: ``adapter`` name or ``base``)."""

    task: str
    label: str
    n: int
    correct: int
    exact_match: float
    seconds: float
    new_tokens: int
    prompt_tokens: int
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def samples_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second (prompt tokens are not counted)."""
        return self.new_tokens / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        return {"n": self.n, "correct": self.correct, "exact_match": round(self.exact_match, 6),
                "seconds": round(self.seconds, 3), "samples_per_s": round(self.samples_per_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "new_tokens": self.new_tokens,
                "prompt_tokens": self.prompt_tokens}


def run_task(model: nn.Module, tokenizer: Any, cfg: "Config", spec: str, settings: GenerationSettings, *,
             limit: int | None = None, label: str = "model", template: str = "auto",
             progress: bool = True) -> TaskResult:
    """Generate an answer to each of the task's first ``limit`` prompts and score it by exact match.

    ``settings.max_new_tokens <= 0`` takes the task's default."""
    from dataclasses import replace

    task, examples = load_examples(resolve_task(spec), limit=limit)
    if settings.max_new_tokens <= 0:
        settings = replace(settings, max_new_tokens=task.max_new_tokens)
    if template == "auto" and cfg is not None and cfg.data.format == "chat":
        settings = replace(settings, add_special_tokens=False)  # the rendered template has its BOS
    texts = [format_prompt(e.prompt, cfg, tokenizer, template) for e in examples]
    t0 = time.perf_counter()
    outs = generate_texts(model, tokenizer, texts, settings, progress=progress, desc=f"{task.name} [{label}]")
    seconds = time.perf_counter() - t0
    records = []
    for i, (ex, out) in enumerate(zip(examples, outs)):
        s = score_one(out.text, ex.reference, task.extractor)
        records.append({"model": label, "task": task.name, "index": i, "prompt": ex.prompt,
                        "reference": ex.reference, "completion": out.text, "predicted_answer": s.predicted,
                        "reference_answer": s.reference, "correct": s.correct, "new_tokens": len(out.ids)})
    correct = sum(r["correct"] for r in records)
    return TaskResult(task.name, label, len(records), correct, correct / max(len(records), 1), seconds,
                      sum(len(o.ids) for o in outs), sum(o.prompt_tokens for o in outs), records)


def run_tasks(model: nn.Module, tokenizer: Any, cfg: "Config", specs: list[str], settings: GenerationSettings,
              **kwargs: Any) -> list[TaskResult]:
    """:func:`run_task` for every spec, in order."""
    return [run_task(model, tokenizer, cfg, s, settings, **kwargs) for s in specs]


def write_results(out_dir: Path, results: list[TaskResult], summary: dict) -> tuple[Path, Path]:
    """``out_dir/predictions.jsonl`` and ``out_dir/summary.json`` (``summary`` plus each result's
    numbers under ``results[label][task]``), atomically. Returns both paths."""
    out_dir = Path(out_dir)
    table: dict[str, dict] = summary.setdefault("results", {})
    for r in results:
        table.setdefault(r.label, {})[r.task] = r.summary()
    preds = out_dir / "predictions.jsonl"
    atomic_write_text(preds, "".join(json.dumps(rec) + "\n" for r in results for rec in r.records))
    summ = out_dir / "summary.json"
    atomic_write_text(summ, json.dumps(summary, indent=2) + "\n")
    return preds, summ


def settings_from_config(cfg: "Config") -> GenerationSettings:
    """The in-training generation settings: greedy, ``eval.max_new_tokens`` (0 = task default)."""
    return GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed)


def training_eval(model: nn.Module, tokenizer: Any, cfg: "Config", step: int) -> dict:
    """The ``eval.tasks`` evaluation at ``step``: writes ``<output_dir>/eval/step-<N>/`` and returns
    the metrics row ``{"step", "eval_<task>_exact_match", "eval_<task>_samples_per_s", ...}``."""
    results = run_tasks(model, tokenizer, cfg, list(cfg.eval.tasks), settings_from_config(cfg),
                        limit=cfg.eval.limit or None, label="adapter",
                        progress=cfg.output.progress_bar)
    out = Path(cfg.output_dir) / "eval" / f"step-{step:06d}"
    write_results(out, results, {"step": step, "settings": asdict(settings_from_config(cfg)),
                                 "limit": cfg.eval.limit or None})
    row: dict[str, Any] = {"step": step}
    for r in results:
        row[f"eval_{r.task}_exact_match"] = round(r.exact_match, 6)
        row[f"eval_{r.task}_n"] = r.n
        row[f"eval_{r.task}_samples_per_s"] = round(r.samples_per_s, 3)
    return row
