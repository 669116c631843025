"""Data lint: what ``qlora-trainer data-check`` reports before any GPU time is spent."""

from __future__ import annotations

from typing import Any

from qlora_trainer.data.formats import IGNORE_INDEX, PREFERENCE_FORMATS
from qlora_trainer.data.pipeline import prepare
from qlora_trainer.data.preference import PreferenceStats

MASK_OPEN, MASK_CLOSE = "[[", "]]"  # around tokens that carry no loss in the rendered sample


def check_data(cfg: Any, tokenizer: Any, *, seed: int) -> dict[str, Any]:
    """Build the datasets of ``cfg`` (a full Config) and summarise them as a JSON-able dict."""
    prep = prepare(cfg.data, tokenizer, seed=seed)
    if cfg.data.format in PREFERENCE_FORMATS:
        return {"path": cfg.data.path, "format": cfg.data.format, "seq_len": cfg.data.seq_len,
                **preference_report(prep, tokenizer), "warnings": []}
    s = prep.stats
    lengths = sorted(s.lengths)
    first = prep.train[0]
    report: dict[str, Any] = {
        "path": cfg.data.path,
        "format": cfg.data.format,
        "seq_len": cfg.data.seq_len,
        "records": s.records,
        "train_sequences": len(prep.train),
        "eval_sequences": len(prep.eval) if prep.eval is not None else 0,
        "tokens": sum(lengths),
        "trainable_tokens": sum(s.trainable_tokens),
        "length_percentiles": {f"p{q}": _pct(lengths, q) for q in (0, 50, 90, 95, 99, 100)},
        "prompt_truncated": s.prompt_truncated,
        "answer_truncated": s.answer_truncated,
        "zero_trainable_tokens": s.dropped_no_target,
        "missing_eos": s.missing_eos,
        "duplicates": s.duplicates,
        "first_sample": render_masked(tokenizer, first["input_ids"], first["labels"]),
    }
    report["warnings"] = _warnings(report)
    return report


def render_masked(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """Decode a sample with its no-loss spans wrapped in ``[[ ]]``."""
    out, i = [], 0
    while i < len(ids):
        masked = labels[i] == IGNORE_INDEX
        j = i
        while j < len(ids) and (labels[j] == IGNORE_INDEX) == masked:
            j += 1
        text = tokenizer.decode(ids[i:j])
        out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked else text)
        i = j
    return "".join(out)


def format_report(r: dict[str, Any]) -> str:
    if r["format"] in PREFERENCE_FORMATS:
        import json

        return json.dumps(r, indent=2)
    pct = "  ".join(f"{k}={v}" for k, v in r["length_percentiles"].items())
    lines = [
        f"data: {r['path']}  (format {r['format']}, seq_len {r['seq_len']})",
        f"records:               {r['records']:,}",
        f"train / eval sequences: {r['train_sequences']:,} / {r['eval_sequences']:,}",
        f"tokens (trainable):    {r['tokens']:,} ({r['trainable_tokens']:,})",
        f"length percentiles:    {pct}",
        f"truncated:             {r['prompt_truncated']:,} prompt cut from the left, "
        f"{r['answer_truncated']:,} answer cut on the right",
        f"zero trainable tokens: {r['zero_trainable_tokens']:,} (dropped)",
        f"missing EOS:           {r['missing_eos']:,}",
        f"duplicates:            {r['duplicates']:,}",
        f"first sample ({MASK_OPEN}no loss{MASK_CLOSE}):",
        r["first_sample"],
    ]
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def _pct(sorted_vals: list[int], q: int) -> int:
    if not sorted_vals:
        return 0
    return sorted_vals[min(len(sorted_vals) - 1, round(q / 100 * (len(sorted_vals) - 1)))]


def _warnings(r: dict[str, Any]) -> list[str]:
    w = []
    n = max(1, r["train_sequences"])
    if r["prompt_truncated"] + r["answer_truncated"] > 0.05 * n:
        w.append(f"{r['prompt_truncated'] + r['answer_truncated']} samples exceed seq_len={r['seq_len']}; "
                 "consider a larger data.seq_len")
    if r["answer_truncated"]:
        w.append(f"{r['answer_truncated']} answers were cut and end without EOS")
    if r["zero_trainable_tokens"]:
        w.append(f"{r['zero_trainable_tokens']} samples had no trainable token and were dropped")
    if r["duplicates"] > 0.01 * n:
        w.append(f"{r['duplicates']} duplicate sequences")
    if r["length_percentiles"]["p100"] < r["seq_len"] // 4 and r["format"] != "text":
        w.append("samples are much shorter than seq_len; data.pack=true would cut padding")
    return w


def preference_report(prep: Any, tokenizer: Any) -> dict[str, Any]:
    """``data-check``'s preference fields: pairs, lengths and truncation per side, a first sample."""
    s: PreferenceStats = prep.stats
    report: dict[str, Any] = {"records": s.records, "pairs" if "chosen" in s.lengths else "examples": s.pairs,
                              "dropped_no_completion": s.dropped,
                              "train_sequences": len(prep.train),
                              "eval_sequences": len(prep.eval) if prep.eval is not None else 0}
    for side, lengths in s.lengths.items():
        srt = sorted(lengths)
        report[side] = {"tokens": sum(srt), "length_percentiles": {f"p{q}": _pct(srt, q) for q in (0, 50, 90, 100)},
                        "prompt_truncated": s.prompt_truncated[side], "answer_truncated": s.answer_truncated[side]}
    first = prep.train[0]
    if "prompt_text" in first:
        report["first_prompt"] = first["prompt_text"]
    elif "chosen_input_ids" in first:
        report["first_chosen"] = render_masked(tokenizer, first["chosen_input_ids"], first["chosen_labels"])
        report["first_rejected"] = render_masked(tokenizer, first["rejected_input_ids"], first["rejected_labels"])
    else:
        report["desirable"] = s.desirable
        ids = first["prompt_ids"] + first["completion_ids"]
        report["first_sample"] = render_masked(tokenizer, ids, [IGNORE_INDEX] * len(first["prompt_ids"])
                                               + first["completion_ids"])
    return report
