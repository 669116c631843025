"""Evaluation: dataset loss / perplexity and generation tasks scored by exact match.

- ``extractors.py``: answer extractors (GSM8K ``####``, last number, first line, exact) + scoring
- ``tasks.py``: task specs (``gsm8k``, ``FILE@extractor``) and their examples
- ``generation.py``: batched, left-padded, KV-cached generation sized by ``memory.inference``
- ``perplexity.py``: mean loss / perplexity through the training data pipeline
- ``runner.py``: run tasks on a loaded model, write predictions + summary, the in-training hook

``qlora-trainer eval`` (commands/eval.py) and ``eval.tasks`` both go through ``runner``.
"""

from qlora_trainer.evaluate.extractors import (EXTRACTORS, exact_match, get_extractor, gsm8k_answer,
                                               register_extractor, score_one)
from qlora_trainer.evaluate.generation import (Completion, GenerationSettings, format_prompt, generate_batch,
                                               generate_texts)
from qlora_trainer.evaluate.perplexity import dataset_loss
from qlora_trainer.evaluate.runner import TaskResult, run_task, run_tasks, training_eval, write_results
from qlora_trainer.evaluate.tasks import TASKS, GenerationTask, load_examples, register_task, resolve_task

__all__ = [
    "EXTRACTORS", "TASKS", "Completion", "GenerationSettings", "GenerationTask", "TaskResult", "dataset_loss",
    "exact_match", "format_prompt", "generate_batch", "generate_texts", "get_extractor", "gsm8k_answer",
    "load_examples", "register_extractor", "register_task", "resolve_task", "run_task", "run_tasks", "score_one",
    "training_eval", "write_results",
]
