"""Record -> (rendered text segments, which characters carry loss) -> token ids + labels.

Every non-text format renders a record as a list of ``(text, is_completion)`` segments, tokenizes the
joined string once with offsets (so the tokenization is exactly what the model sees at inference) and
marks a token as completion when its characters overlap a completion segment. Chat templates with
``{% generation %}`` blocks give the assistant mask directly (``return_assistant_tokens_mask``);
others are rendered incrementally and diffed to find each assistant turn's characters.

Truncation (``truncate``): a sample longer than ``seq_len`` loses prompt tokens from the left first
(keeping a leading BOS and the whole answer); only if the answer alone is too long is it cut on the
right. Samples left with no completion token are dropped and counted.
"""

from __future__ import annotations

import re
from typing import Any

from qlora_trainer.data.templates import CHAT_TEMPLATES, chat_template_for  # noqa: F401 - re-exported
from qlora_trainer.errors import DataError

IGNORE_INDEX = -100
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")  # templates that mark assistant text

ALPACA = {
    "with_input": ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "no_input": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}

# format -> {field: required}
FIELDS: dict[str, dict[str, bool]] = {
    "text": {"text": True},
    "instruction": {"instruction": True, "input": False, "output": True},
    "prompt_completion": {"prompt": True, "completion": True},
    "chat": {"messages": True},
    "sharegpt": {"conversations": True},
    # preference formats as TRL defines them (data/preference.py); no prompt column = implicit prompt
    "preference": {"prompt": False, "chosen": True, "rejected": True},
    "unpaired": {"prompt": True, "completion": True, "label": True},
    "prompt_only": {"prompt": True},  # + any columns the reward functions read
}
PREFERENCE_FORMATS = ("preference", "unpaired", "prompt_only")
CHAT_FORMATS = ("chat", "sharegpt")  # rendered through a chat template

# ShareGPT ``from`` -> chat role
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool",
                  "function_response": "tool"}


def column_names(fmt: str, mapping: dict[str, str]) -> dict[str, str]:
    """Format field name -> dataset column, after ``data.fields``; unknown mapping keys are errors."""
    known = FIELDS[fmt]
    bad = [k for k in mapping if k not in known]
    if bad:
        raise DataError(f"data.fields: {bad[0]!r} is not a field of format {fmt!r} (fields: {', '.join(known)})")
    return {name: mapping.get(name, name) for name in known}


def check_template(template: str) -> None:
    """Raise DataError if a custom instruction template has unknown placeholders or no {instruction}."""
    if template == "alpaca":
        return
    import string

    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if "instruction" not in names or names - {"instruction", "input"}:
        raise DataError(f"data.template: {template!r} must be 'alpaca' or a format string with {{instruction}} "
                        "and optionally {input} (no other placeholders)")


def instruction_prompt(instruction: str, inp: str | None, template: str) -> str:
    if template == "alpaca":
        return ALPACA["with_input" if inp else "no_input"].format(instruction=instruction, input=inp or "")
    return template.format(instruction=instruction, input=inp or "")


def encode_segments(tokenizer: Any, segments: list[tuple[str, bool]], *, add_special_tokens: bool = True
                    ) -> tuple[list[int], list[bool]]:
    """Tokenize the joined segments once; a token is completion if its characters overlap a completion
    segment. Returns ``(ids (T,), is_completion (T,))``."""
    return encode_segments_batch(tokenizer, [segments], add_special_tokens=add_special_tokens)[0]


def encode_segments_batch(tokenizer: Any, batch: list[list[tuple[str, bool]]], *, add_special_tokens: bool = True
                          ) -> list[tuple[list[int], list[bool]]]:
    """:func:`encode_segments` for many samples in one (parallel, Rust-side) tokenizer call."""
    texts, spans = [], []
    for segments in batch:
        sp, pos = [], 0
        for text, is_completion in segments:
            if is_completion and text:
                sp.append((pos, pos + len(text)))
            pos += len(text)
        texts.append("".join(t for t, _ in segments))
        spans.append(sp)
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        mask = [e > s and any(e > a and s < b for a, b in sp) for s, e in offsets]
        out.append((list(ids), mask))
    return out


def chat_encode(tokenizer: Any, messages: list[dict], template: str) -> tuple[list[int], list[bool]]:
    """Render ``messages`` with ``template``; mask = assistant tokens only."""
    if _GENERATION.search(template):
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)

    full = render(messages, False)
    segments, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight") == 0:
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if start < pos or not full.startswith(render(messages[: i + 1], False)):
            raise DataError("data.chat_template: the tokenizer's chat template does not render conversations "
                            "prefix by prefix; set a template with {% generation %} blocks")
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return encode_segments(tokenizer, segments, add_special_tokens=False)


def truncate(ids: list[int], mask: list[bool], seq_len: int, bos_id: int | None
             ) -> tuple[list[int], list[bool], int]:
    """Fit a sample into ``seq_len``. Returns ``(ids, mask, status)``: status 0 fits, 1 prompt cut from
    the left (answer kept whole), 2 answer cut on the right."""
    excess = len(ids) - seq_len
    if excess <= 0:
        return ids, mask, 0
    head = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    first = next((i for i, m in enumerate(mask) if m), len(mask))
    cut = min(excess, max(0, first - head))
    ids, mask = ids[:head] + ids[head + cut:], mask[:head] + mask[head + cut:]
    if len(ids) <= seq_len:
        return ids, mask, 1
    return ids[:seq_len], mask[:seq_len], 2


def labels_from(ids: list[int], mask: list[bool], train_on_prompt: bool) -> list[int]:
    return list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def render_segments(rec: dict[str, Any], fmt: str, cols: dict[str, str], template: str
                    ) -> list[tuple[str, bool]]:
    """An instruction or prompt/completion record -> ``[(prompt, False), (completion, True)]``."""
    if fmt == "instruction":
        inp = rec.get(cols["input"]) if cols["input"] in rec else None
        return [(instruction_prompt(rec[cols["instruction"]], inp, template), False), (rec[cols["output"]], True)]
    if fmt == "prompt_completion":
        return [(rec[cols["prompt"]], False), (rec[cols["completion"]], True)]
    raise ValueError(f"render_segments does not handle format {fmt!r}")


def encode_records(batch: dict[str, list], fmt: str, cols: dict[str, str], *, template: str,
                   chat_template: str | None, tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """A ``datasets`` batch of validated records -> ``(ids, is_completion)`` per record, before EOS and
    truncation."""
    n = len(next(iter(batch.values())))
    recs = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    if fmt == "chat":
        return [chat_encode(tokenizer, to_messages(r[cols["messages"]]), chat_template or "") for r in recs]
    if fmt == "sharegpt":
        return [chat_encode(tokenizer, sharegpt_messages(r[cols["conversations"]]), chat_template or "")
                for r in recs]
    return encode_segments_batch(tokenizer, [render_segments(r, fmt, cols, template) for r in recs])


def validate_records(ds: Any, fmt: str, cols: dict[str, str], where: Any) -> None:
    """Check every record has the format's fields with the right types, before any tokenization.

    ``where(index) -> str`` names the record (``file:line``). Raises DataError at the first problem.
    """
    names = set(ds.column_names)
    for name, required in FIELDS[fmt].items():
        col = cols[name]
        if col not in names:
            if not required:
                continue
            hint = f"; map it with data.fields.{name}=<column>" if name == col else ""
            raise DataError(f"{where(None)}: field {col!r} (format {fmt} needs {name!r}) not found; "
                            f"columns: {', '.join(sorted(names))}{hint}")
        for i, v in enumerate(ds[col]):
            if v is None:
                if required:
                    raise DataError(f"{where(i)}: field {col!r} is missing or null")
                continue
            if fmt == "chat":
                _check_messages(v, col, lambda: where(i))
            elif fmt == "sharegpt":
                _check_sharegpt(v, col, lambda: where(i))
            elif not isinstance(v, str):
                raise DataError(f"{where(i)}: field {col!r} must be a string, got {type(v).__name__}")
            elif required and fmt != "text" and name in ("output", "completion") and not v.strip():
                raise DataError(f"{where(i)}: field {col!r} is empty (nothing to train on)")


def to_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> ``{role, content}`` with string content (a list of ``{type: text, text}``
    parts is joined), plus ``weight`` where set (``0``: an assistant turn shown but not trained);
    other keys (name, ...) are dropped."""
    out = []
    for m in messages:
        out.append({"role": m["role"], "content": _content(m["content"])})
        if m.get("weight") is not None:
            out[-1]["weight"] = m["weight"]
    return out


def sharegpt_messages(turns: list[dict]) -> list[dict]:
    """ShareGPT ``[{from, value}]`` -> chat messages (``human`` -> user, ``gpt`` -> assistant, ...)."""
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _content(c: Any) -> str:
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")


def _is_content(c: Any) -> bool:
    return isinstance(c, str) or (isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                              and isinstance(p.get("text"), str) for p in c))


def _check_messages(v: Any, col: str, where: Any) -> None:
    if not isinstance(v, list) or not v:
        raise DataError(f"{where()}: field {col!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not _is_content(m.get("content")):
            raise DataError(f"{where()}: field {col!r} message {j} needs string 'role' and 'content' (a string "
                            "or a list of {type: text, text} parts)")
        if m.get("weight") not in (None, 0, 1):
            raise DataError(f"{where()}: field {col!r} message {j}: weight must be 0 or 1, got {m['weight']!r}")
    if not any(m["role"] == "assistant" and m.get("weight") != 0 for m in v):
        raise DataError(f"{where()}: field {col!r} has no assistant turn (nothing to train on)")


def _check_sharegpt(v: Any, col: str, where: Any) -> None:
    if not isinstance(v, list) or not v:
        raise DataError(f"{where()}: field {col!r} must be a non-empty list of {{from, value}} turns")
    for j, t in enumerate(v):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(f"{where()}: field {col!r} turn {j} needs string 'from' and 'value'")
        if t.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{where()}: field {col!r} turn {j}: 'from' is {t.get('from')!r}, not one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
    if not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in v):
        raise DataError(f"{where()}: field {col!r} has no gpt/assistant turn (nothing to train on)")
