"""Generation tasks for the notebooks' small byte-level model, scored by the evaluator's exact match.

* :func:`upper_task`: ``Q: k=`` -> ``K``, 26 letter -> capital associations the ~0.8M-parameter model
  can pick up in ~100 supervised steps on the CPU (:func:`finetune_on_task`, loss on answers only), so
  exact match separates the methods where GSM8K (0 % for a model this size, before and after) cannot.
  Harder rules (copying a 1-4 letter word, parity or the last digit of a number) stayed at chance
  within 100-150 steps for every method in our trials.
* :func:`gsm8k_examples`: GSM8K test questions in the fine-tuning format (``Question: ...\\nAnswer:``),
  scored on the ``####`` number.

Both return ``(prompts, references)``; :func:`exact_match_of` generates with
``evaluate.generation`` (batched, greedy) and scores with ``evaluate.extractors``.
"""

from __future__ import annotations

import json
import random
import string

import torch


def upper_task(n: int | None = None, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts ``Q: k=`` with answers ``K``: ``n`` random letters (``seed``), or each of the 26 once when
    ``n`` is None (the eval set)."""
    letters = list(string.ascii_lowercase)
    if n is not None:
        rng = random.Random(seed)
        letters = [rng.choice(string.ascii_lowercase) for _ in range(n)]
    return [f"Q: {c}=" for c in letters], [c.upper() for c in letters]


def finetune_on_task(lm, cfg, prompts: list[str], answers: list[str], eval_prompts: list[str],
                     eval_answers: list[str]):
    """``research.finetune.finetune`` on prompt/answer pairs instead of a byte stream: ``cfg.steps`` steps
    of ``cfg.batch_size`` examples in order, loss on the answers only; eval loss on the eval pairs."""
    from qlora_trainer.lora import trainable_parameters
    from support.finetune import FinetuneResult, _optimizer, prepare
    from support.small_lm import train_steps
    from qlora_trainer.models.loss import causal_lm_loss

    model = prepare(lm, cfg)
    held = sft_batch(eval_prompts, eval_answers)

    @torch.no_grad()
    def held_loss() -> float:
        was = model.training
        model.eval()
        loss_sum, n = causal_lm_loss(model, held, backend="torch")
        model.train(was)
        return float(loss_sum / n)

    def batch(step: int) -> dict[str, torch.Tensor]:
        i = (step * cfg.batch_size) % max(len(prompts) - cfg.batch_size, 1)
        return sft_batch(prompts[i: i + cfg.batch_size], answers[i: i + cfg.batch_size])

    before = held_loss()
    trainable, total = trainable_parameters(model)
    losses, seconds = train_steps(model, _optimizer(model, cfg), None, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                  seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, batch_fn=batch)
    return FinetuneResult(cfg, before, held_loss(), losses, trainable, total, seconds, model.eval())


def gsm8k_examples(n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` GSM8K test questions as ``Question: ...\\nAnswer:`` and their reference answers."""
    from support.paths import data_root

    prompts, refs = [], []
    with (data_root() / "gsm8k" / "test.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if len(prompts) >= n:
                break
            rec = json.loads(line)
            prompts.append(f"Question: {rec['question']}\nAnswer:")
            refs.append(rec["answer"])
    return prompts, refs


def exact_match_of(model: torch.nn.Module, prompts: list[str], references: list[str], *, extractor: str,
                   max_new_tokens: int, batch_size: int = 0):
    """Greedy batched generation for every prompt, scored by ``extractor`` (see ``evaluate.extractors``):
    an ``evaluate.TaskResult`` (``exact_match``, ``samples_per_s``, ``tokens_per_s``, per-sample ``records``)."""
    import time

    from qlora_trainer.evaluate import GenerationSettings, TaskResult, exact_match, generate_texts
    from qlora_trainer.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    t0 = time.perf_counter()
    outs = generate_texts(model, tok, prompts, settings, progress=False)
    seconds = time.perf_counter() - t0
    acc, scored = exact_match([o.text for o in outs], references, extractor)
    records = [{"prompt": p, "completion": o.text, "predicted_answer": s.predicted, "correct": s.correct}
               for p, o, s in zip(prompts, outs, scored)]
    return TaskResult("task", "model", len(prompts), sum(s.correct for s in scored), acc, seconds,
                      sum(len(o.ids) for o in outs), sum(o.prompt_tokens for o in outs), records)


def sft_batch(prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ``{input_ids, labels, attention_mask}`` (B, T) of ``prompt + " " + answer + "\\n"`` byte
    ids, loss on the answer and newline only (as the trainer masks prompts)."""
    from qlora_trainer.data.formats import IGNORE_INDEX
    from support.small_lm import encode

    rows = [(encode(p), encode(f" {a}\n")) for p, a in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.cat([p, a])
        labels[i, len(p):n] = a
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
