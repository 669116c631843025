"""Preference data as TRL defines it: records -> tokenized sides -> batches.

Formats (``data.format``; columns renamed with ``data.fields``):

* ``preference``: ``prompt``/``chosen``/``rejected``. Without a ``prompt`` column the prompt is
  implicit: the longest shared prefix of ``chosen`` and ``rejected`` (TRL's ``extract_prompt``).
  Values are strings (plain) or message lists (conversational, rendered through the chat template;
  the prompt's own assistant turns are shown but not scored).
* ``unpaired``: ``prompt``/``completion``/``label`` (bool: desirable or not) for KTO.
* ``prompt_only``: ``prompt`` plus extra columns (GRPO: completions are sampled in training and
  scored by reward functions that read the extra columns, e.g. ``answer``).

Each side is rendered as ``[(prompt, no loss), (completion, loss)]`` and tokenized once with offsets
(``formats.encode_segments``), so only completion tokens score; EOS is appended; a side longer than
``seq_len`` loses prompt tokens from the left first (``formats.truncate``), per side.

Rows: preference ``{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}``; unpaired
``{prompt_ids, completion_ids, label}``; prompt-only ``{prompt_text, prompt_ids, <extra columns>}``. Batches (:func:`collate`): preference ``input_ids`` /
``labels`` / ``attention_mask`` of shape (2B, T), rows ``[chosen_1..B; rejected_1..B]``; unpaired
(B, T) plus ``label`` (B,) and the KL rows ``kl_*`` (prompt i with the completion of row i-1, as
TRL pairs them for KTO's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.data import formats
from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.errors import DataError
from qlora_trainer.data.templates import resolve_chat_template

if TYPE_CHECKING:
    from datasets import Dataset

    from qlora_trainer.config import DataConfig

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


@dataclass
class PreferenceStats:
    """What ``data-check`` reports for preference data (per side where sides exist)."""

    records: int = 0
    pairs: int = 0
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """side -> token lengths after truncation (``chosen``/``rejected`` or ``completion``)."""
    prompt_truncated: dict[str, int] = field(default_factory=dict)
    answer_truncated: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    desirable: int = 0


def is_preference(dataset: Any) -> bool:
    names = getattr(dataset, "column_names", None)
    if names is None:
        try:
            names = list(dataset[0].keys())
        except (IndexError, KeyError, TypeError, AttributeError):
            return False
    return "chosen_input_ids" in names or "completion_ids" in names or "prompt_text" in names


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two completions sharing a prefix (strings or message lists);
    for strings a space just before the split stays with the completions (TRL's rule)."""
    n = min(len(chosen), len(rejected))
    i = next((k for k in range(n) if chosen[k] != rejected[k]), n)
    if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _conversational(v: Any) -> bool:
    return isinstance(v, list)


class _Encode:
    """Prompt + completion -> (ids, is_completion) for one side: plain or conversational."""

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self.tok, self.chat_template = tokenizer, chat_template

    def __call__(self, prompt: Any, completion: Any) -> tuple[list[int], list[bool]]:
        if _conversational(completion) or _conversational(prompt):
            if self.chat_template is None:
                raise DataError("conversational preference data needs a chat template (data.chat_template)")
            shown = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in formats.to_messages(prompt or [])]
            return formats.chat_encode(self.tok, shown + formats.to_messages(completion), self.chat_template)
        return formats.encode_segments(self.tok, [(prompt or "", False), (completion, True)])


def _side(enc: _Encode, prompt: Any, completion: Any, cfg: "DataConfig", tok: Any
          ) -> tuple[list[int], list[bool], int]:
    ids, mask = enc(prompt, completion)
    if not ids or ids[-1] != tok.eos_token_id:
        ids, mask = ids + [tok.eos_token_id], mask + [True]
    return formats.truncate(ids, mask, cfg.seq_len, tok.bos_token_id)


def validate_preference(ds: "Dataset", fmt: str, cols: dict[str, str], where: Any) -> None:
    names = set(ds.column_names)
    for name, required in formats.FIELDS[fmt].items():
        col = cols[name]
        if col not in names:
            if required:
                raise DataError(f"{where(None)}: field {col!r} (format {fmt} needs {name!r}) not found; columns: "
                                f"{', '.join(sorted(names))}; map it with data.fields.{name}=<column>")
            continue
        for i, v in enumerate(ds[col]):
            if name == "label":
                if not isinstance(v, bool) and v not in (0, 1):
                    raise DataError(f"{where(i)}: field {col!r} must be true or false, got {v!r}")
            elif not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, dict) for m in v))):
                raise DataError(f"{where(i)}: field {col!r} must be a string or a list of messages, got "
                                f"{type(v).__name__}")


def tokenize_preference(cfg: "DataConfig", tokenizer: Any, raw: "Dataset", raw_eval: "Dataset | None",
                        cols: dict[str, str]) -> tuple["Dataset", "Dataset | None", PreferenceStats]:
    """Tokenized train / eval rows of validated preference records (``pipeline.prepare`` loads,
    checks, limits and splits them) and the training statistics."""
    chat_template = None
    if len(raw) and any(_conversational(raw[0].get(c)) for c in cols.values()):

        chat_template, _ = resolve_chat_template(tokenizer, cfg.chat_template, cfg.marker_tokens)
    enc = _Encode(tokenizer, chat_template)
    stats = PreferenceStats(records=len(raw))
    train = _tokenize(raw, cfg, cols, enc, tokenizer, stats)
    ev = _tokenize(raw_eval, cfg, cols, enc, tokenizer, PreferenceStats()) if raw_eval is not None else None
    if len(train) == 0:
        raise DataError(f"{cfg.path}: no record has a completion token left after truncation to "
                        f"data.seq_len={cfg.seq_len}")
    return train, ev, stats


def _tokenize(raw: "Dataset", cfg: "DataConfig", cols: dict[str, str], enc: _Encode, tok: Any,
              stats: PreferenceStats) -> "Dataset":
    from datasets import Dataset

    if cfg.format == "prompt_only":
        return _prompts(raw, cfg, cols, enc, tok, stats)
    rows: dict[str, list] = {c: [] for c in (PAIR_COLUMNS if cfg.format == "preference" else UNPAIRED_COLUMNS)}
    sides = ("chosen", "rejected") if cfg.format == "preference" else ("completion",)
    for s in sides:
        stats.lengths.setdefault(s, [])
        stats.prompt_truncated.setdefault(s, 0)
        stats.answer_truncated.setdefault(s, 0)
    for rec in raw:
        prompt = rec.get(cols["prompt"]) if cols["prompt"] in rec else None
        if cfg.format == "preference":
            chosen, rejected = rec[cols["chosen"]], rec[cols["rejected"]]
            if prompt is None:
                prompt, chosen, rejected = implicit_prompt(chosen, rejected)
            encoded = {s: _side(enc, prompt, c, cfg, tok) for s, c in (("chosen", chosen), ("rejected", rejected))}
        else:
            encoded = {"completion": _side(enc, prompt, rec[cols["completion"]], cfg, tok)}
        if any(not any(m) for _, m, _ in encoded.values()):
            stats.dropped += 1
            continue
        for s, (ids, mask, status) in encoded.items():
            stats.lengths[s].append(len(ids))
            stats.prompt_truncated[s] += status == 1
            stats.answer_truncated[s] += status == 2
            if cfg.format == "preference":
                rows[f"{s}_input_ids"].append(ids)
                rows[f"{s}_labels"].append(formats.labels_from(ids, mask, False))
            else:
                first = mask.index(True)
                rows["prompt_ids"].append(ids[:first])
                rows["completion_ids"].append(ids[first:])
                rows["label"].append(bool(rec[cols["label"]]))
                stats.desirable += bool(rec[cols["label"]])
        stats.pairs += 1
    return Dataset.from_dict(rows)


def _prompts(raw: "Dataset", cfg: "DataConfig", cols: dict[str, str], enc: _Encode, tok: Any,
             stats: PreferenceStats) -> "Dataset":
    """Prompt-only rows: the prompt as text (rendered with the chat template when conversational,
    ending in the assistant's generation prompt) and its tokens, the record's other columns kept."""
    from datasets import Dataset

    extra = [c for c in raw.column_names if c != cols["prompt"]]
    rows: dict[str, list] = {"prompt_text": [], "prompt_ids": [], **{c: [] for c in extra}}
    stats.lengths.setdefault("prompt", [])
    stats.prompt_truncated.setdefault("prompt", 0)
    stats.answer_truncated.setdefault("prompt", 0)
    for rec in raw:
        prompt = rec[cols["prompt"]]
        if _conversational(prompt):
            text = tok.apply_chat_template(formats.to_messages(prompt), chat_template=enc.chat_template,
                                           add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text, ids = prompt, tok(prompt)["input_ids"]
        if len(ids) > cfg.seq_len:  # the prompt alone does not fit: dropped, counted
            stats.prompt_truncated["prompt"] += 1
            stats.dropped += 1
            continue
        rows["prompt_text"].append(text)
        rows["prompt_ids"].append(ids)
        for c in extra:
            rows[c].append(rec[c])
        stats.lengths["prompt"].append(len(ids))
        stats.pairs += 1
    return Dataset.from_dict(rows)


def prompt_collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, list]:
    """Prompt-only rows -> ``{column: list}`` (texts and extra columns; nothing to pad before rollout)."""
    return {k: [s[k] for s in samples] for k in samples[0] if k != "prompt_ids"}


def row_lengths(dataset: Any) -> list[int]:
    """Tokens a row puts into a batch (both sides of a pair), for length grouping."""
    if "chosen_input_ids" in dataset.column_names:
        return [len(c) + len(r) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
    if "prompt_text" in dataset.column_names:
        return [len(p) for p in dataset["prompt_ids"]]
    return [len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"])]


def pad_rows(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad: input_ids (N,T), labels (N,T) -100 on padding, attention_mask (N,T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], lab[i, :len(s)], att[i, :len(s)] = torch.tensor(s), torch.tensor(y), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def pair_collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> (2B, T) rows ``[chosen; rejected]`` padded to the longest of both sides."""
    seqs = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
    labels = [s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples]
    return pad_rows(seqs, labels, pad_id)


def unpaired_collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B examples -> (B, T) rows, ``label`` (B,), and ``kl_*`` rows: prompt i + completion i-1."""
    def rows(completions: list[list[int]]) -> dict[str, torch.Tensor]:
        seqs = [s["prompt_ids"] + c for s, c in zip(samples, completions)]
        labels = [[IGNORE_INDEX] * len(s["prompt_ids"]) + c for s, c in zip(samples, completions)]
        return pad_rows(seqs, labels, pad_id)

    own = [s["completion_ids"] for s in samples]
    batch = rows(own)
    batch.update({f"kl_{k}": v for k, v in rows(own[-1:] + own[:-1]).items()})
    batch["label"] = torch.tensor([bool(s["label"]) for s in samples], dtype=torch.long)
    return batch


def collate_for(dataset: Any, pad_id: int) -> Any:
    """The collate function for a tokenized preference dataset."""
    names = dataset.column_names
    fn = pair_collate if "chosen_input_ids" in names else prompt_collate if "prompt_text" in names else unpaired_collate
    return partial(fn, pad_id=pad_id)
