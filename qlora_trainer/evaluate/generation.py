"""Batched, left-padded, KV-cached generation (``eval`` and ``generate`` share it).

Prompts are tokenized exactly as training tokenized them (``tokenizer(text)`` with its special
tokens), left-padded to the batch's longest with the pad token and an attention mask, so every
sequence's last prompt token sits at the same position and new tokens append on the right;
transformers' ``generate`` derives the position ids from the mask, so a padded prompt sees the
positions it would see alone. Greedy by default; sampling is seeded per batch inside ``fork_rng``
(the caller's RNG stream, e.g. a training run's, is left as it was).

:func:`generate_texts` sorts prompts by length (less padding), cuts them into batches whose size
fits the memory budget (:func:`auto_batch_size`, from ``memory.inference``), shows a tqdm bar and
returns completions in the input order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_trainer.data.formats import chat_template_for, instruction_prompt
from qlora_trainer.memory.inference import largest_generation_batch
from qlora_trainer.models.catalog import arch_from_hf_config


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode."""

    max_new_tokens: int = 256
    """New tokens per prompt at most (generation stops earlier at EOS)."""
    sample: bool = False
    """Sample (temperature / top-p) instead of greedy decoding."""
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    """Sampling seed; batch ``i`` uses ``seed + i``."""
    batch_size: int = 0
    """Prompts per batch; 0 = the largest that fits the memory budget (at most ``MAX_AUTO_BATCH``)."""
    add_special_tokens: bool = True
    """Let the tokenizer add BOS etc. (as training does for text/instruction data; a rendered chat
    template carries its own, so chat prompts use False)."""


@dataclass(frozen=True)
class Completion:
    """One prompt's output: ``ids`` are the new tokens up to and including EOS."""

    text: str
    ids: list[int]
    prompt_tokens: int


MAX_AUTO_BATCH = 64
log = logging.getLogger(__name__)


def format_prompt(prompt: str, cfg: Any, tokenizer: Any, template: str = "auto") -> str:
    """The prompt as the model saw prompts in training (``data.format`` / ``data.template``), or raw."""
    if template == "raw":
        return prompt

    if cfg.data.format == "instruction":
        return instruction_prompt(prompt, None, cfg.data.template)
    if cfg.data.format in ("chat", "sharegpt"):
        tpl = chat_template_for(tokenizer, cfg.data.chat_template)
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=tpl,
                                             add_generation_prompt=True, tokenize=False)
    return prompt


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_batch(model: nn.Module, tokenizer: Any, texts: list[str], settings: GenerationSettings,
                   *, batch_index: int = 0) -> list[Completion]:
    """Decode one left-padded batch of ``texts``; returns each one's new text and tokens."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"] for t in texts]
    width, pad = max(len(e) for e in encoded), _pad_id(tokenizer)
    ids = torch.full((len(texts), width), pad, dtype=torch.long)       # (B, P) left-padded
    mask = torch.zeros((len(texts), width), dtype=torch.long)         # (B, P) 1 = real token
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
                                  use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    if settings.sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed + batch_index)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)  # (B, P + N)
    model.train(was_training)
    results = []
    for i, e in enumerate(encoded):
        new = out[i, width:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        results.append(Completion(tokenizer.decode(new, skip_special_tokens=True), new, len(e)))
    return results


def auto_batch_size(model: nn.Module, *, prompt_len: int, new_tokens: int, cap: int = MAX_AUTO_BATCH) -> int:
    """The largest batch whose KV cache and transients fit the free memory (CUDA: free device memory;
    CPU: half the available RAM), at least 1. The weights are loaded already, so only the
    per-sequence part is counted (``memory.inference.generation_memory``)."""
    p = next(model.parameters())
    act_bytes = 2 if p.dtype in (torch.bfloat16, torch.float16) else 4
    try:
        arch = arch_from_hf_config(model.config.to_dict())
    except Exception:  # noqa: BLE001 - an unknown architecture: fall back to a small batch
        return min(cap, 8)
    if p.device.type == "cuda":
        free = int(torch.cuda.mem_get_info(p.device)[0] * 0.9)
    else:
        import os

        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return max(1, largest_generation_batch(arch, free, prompt_len=prompt_len, new_tokens=new_tokens,
                                           act_bytes=act_bytes, cap=cap, include_weights=False))


def generate_texts(model: nn.Module, tokenizer: Any, texts: list[str], settings: GenerationSettings, *,
                   progress: bool = True, desc: str = "generate") -> list[Completion]:
    """Completions of every text in input order, in length-sorted batches (size from the settings,
    or :func:`auto_batch_size` for the longest prompt), with a tqdm bar over prompts."""
    from tqdm.auto import tqdm

    if not texts:
        return []
    lengths = [len(tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    bs = settings.batch_size or auto_batch_size(model, prompt_len=max(lengths), new_tokens=settings.max_new_tokens)
    log.info("%s: %d prompts in batches of %d (%s)", desc, len(texts), bs,
             "set" if settings.batch_size else "largest that fits the memory budget")
    results: list[Completion | None] = [None] * len(texts)
    with tqdm(total=len(texts), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for b, start in enumerate(range(0, len(order), bs)):
            idx = order[start: start + bs]
            for i, c in zip(idx, generate_batch(model, tokenizer, [texts[i] for i in idx], settings, batch_index=b)):
                results[i] = c
            bar.update(len(idx))
    return [r for r in results if r is not None]
