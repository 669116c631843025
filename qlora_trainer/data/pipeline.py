"""``build_datasets``: config -> tokenized train/eval datasets of ``{input_ids, labels}`` + statistics.

Steps, all before any model is loaded: load records (sources.py) -> check fields and types with
``file:line`` errors (formats.validate_records) -> shuffle + ``max_samples`` -> eval carve -> tokenize,
mask, truncate through ``datasets.map`` (batched, deterministic, cached for file-backed data) ->
drop samples left without a trainable token (counted, warned).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_trainer.data import formats, preference
from qlora_trainer.data.sources import load_records, record_line, split_records
from qlora_trainer.errors import DataError
from qlora_trainer.data.templates import resolve_chat_template

if TYPE_CHECKING:
    from datasets import Dataset

    from qlora_trainer.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """Counts gathered while building (data-check prints them; the trainer logs them)."""

    records: int = 0
    sequences: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    dropped_no_target: int = 0
    lengths: list[int] = field(default_factory=list)
    trainable_tokens: list[int] = field(default_factory=list)
    missing_eos: int = 0
    duplicates: int = 0


@dataclass
class PreparedData:
    train: "Dataset"
    eval: "Dataset | None"
    stats: DataStats
    train_raw: "Dataset"


def build_datasets(cfg: "DataConfig", tokenizer: Any, *, seed: int) -> tuple["Dataset", "Dataset | None"]:
    """Train and eval (or None) datasets; each row is ``{"input_ids": list[int], "labels": list[int]}``
    with labels -100 on tokens that carry no loss. Raises DataError before training on bad data."""
    prep = prepare(cfg, tokenizer, seed=seed)
    s = prep.stats
    if cfg.format in formats.PREFERENCE_FORMATS:  # preference data: per-side counts (data/preference.py)
        _warn_preference(s, cfg.seq_len)
        return prep.train, prep.eval
    if s.prompt_truncated or s.answer_truncated:
        log.warning("data: %d samples longer than seq_len=%d had their prompt cut from the left, %d their answer "
                    "cut on the right", s.prompt_truncated, cfg.seq_len, s.answer_truncated)
    if s.dropped_no_target:
        log.warning("data: dropped %d samples with no trainable token left", s.dropped_no_target)
    return prep.train, prep.eval


def prepare(cfg: "DataConfig", tokenizer: Any, *, seed: int) -> PreparedData:
    """:func:`build_datasets` plus the statistics and the raw training records."""
    if cfg.format in formats.PREFERENCE_FORMATS:
        return _prepare_preference(cfg, tokenizer, seed)
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token: set one (tokenizer.eos_token) or use a tokenizer that has "
                        "one, otherwise the model never learns to stop")
    cols = formats.column_names(cfg.format, cfg.fields)
    if cfg.format == "instruction":
        formats.check_template(cfg.template)
    chat = cfg.format in formats.CHAT_FORMATS
    chat_template = formats.chat_template_for(tokenizer, cfg.chat_template) if chat else None

    raw = load_records(cfg.path, split=cfg.split)
    formats.validate_records(raw, cfg.format, cols, _namer(cfg.path, raw))
    raw_eval = None
    if cfg.eval_path:
        raw_eval = load_records(cfg.eval_path, split=cfg.split, key="data.eval_path")
        formats.validate_records(raw_eval, cfg.format, cols, _namer(cfg.eval_path, raw_eval))
    if chat:  # markers are single tokens (or added, or split as configured); BOS warning

        chat_template, _ = resolve_chat_template(tokenizer, cfg.chat_template, cfg.marker_tokens)

    text = cfg.format == "text"
    n_records = len(raw)
    if not text:
        raw = _limit(raw, cfg.max_samples, seed)
        n_records = len(raw)
        if raw_eval is None:
            raw, raw_eval = split_records(raw, cfg.eval_fraction, seed)
    fn = _Tokenize(cfg, tokenizer, cols, chat_template)
    train = _tokenize(raw, fn, cfg)
    ev = _tokenize(raw_eval, fn, cfg) if raw_eval is not None else None
    if text:  # blocks, not records, are the unit of text data
        train = _limit(train, cfg.max_samples, seed)
        if ev is None:
            train, ev = split_records(train, cfg.eval_fraction, seed)

    stats = _stats(train, n_records, None if text else tokenizer.eos_token_id)
    keep = [i for i, n in enumerate(train["n_target"]) if n > 0]
    stats.dropped_no_target = len(train) - len(keep)
    if not keep:
        raise DataError(f"{cfg.path}: no sample has a trainable token after masking and truncation to "
                        f"data.seq_len={cfg.seq_len}")
    train = _finish(train.select(keep) if len(keep) < len(train) else train)
    if ev is not None:
        ev = _finish(ev.filter(lambda n: n > 0, input_columns="n_target"))
    return PreparedData(train, ev, stats, raw)


def _prepare_preference(cfg: "DataConfig", tokenizer: Any, seed: int) -> PreparedData:
    """:func:`prepare` for the preference formats (``data/preference.py``): its ``stats`` is a
    ``PreferenceStats``."""
    cols = formats.column_names(cfg.format, cfg.fields)
    raw = load_records(cfg.path, split=cfg.split)
    preference.validate_preference(raw, cfg.format, cols, _namer(cfg.path, raw))  # file:line before shuffling
    raw = _limit(raw, cfg.max_samples, seed)
    raw_eval = None
    if cfg.eval_path:
        raw_eval = load_records(cfg.eval_path, split=cfg.split, key="data.eval_path")
        preference.validate_preference(raw_eval, cfg.format, cols, _namer(cfg.eval_path, raw_eval))
    else:
        raw, raw_eval = split_records(raw, cfg.eval_fraction, seed)
    train, ev, stats = preference.tokenize_preference(cfg, tokenizer, raw, raw_eval, cols)
    return PreparedData(train, ev, stats, raw)


def _warn_preference(s: Any, seq_len: int) -> None:
    for side in s.lengths:
        if s.prompt_truncated[side] or s.answer_truncated[side]:
            log.warning("data: %s side: %d samples longer than seq_len=%d had their prompt cut from the left, %d "
                        "their answer cut on the right", side, s.prompt_truncated[side], seq_len,
                        s.answer_truncated[side])
    if s.dropped:
        log.warning("data: dropped %d records with no completion token left", s.dropped)


class _Tokenize:
    """Picklable batched map function (so ``datasets`` can fingerprint and cache it)."""

    def __init__(self, cfg: "DataConfig", tokenizer: Any, cols: dict[str, str], chat_template: str | None):
        self.cfg, self.tok, self.cols, self.chat_template = cfg, tokenizer, cols, chat_template
        self.code_version = _code_version()  # part of the cache fingerprint: edits here invalidate caches

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.cfg.format == "text":
            return self._text(batch[self.cols["text"]])
        out: dict[str, list] = {"input_ids": [], "labels": [], "n_target": [], "status": [], "full_len": []}
        eos, bos = self.tok.eos_token_id, self.tok.bos_token_id
        encoded = formats.encode_records(batch, self.cfg.format, self.cols, template=self.cfg.template,
                                         chat_template=self.chat_template, tokenizer=self.tok)
        for ids, mask in encoded:
            if not ids or ids[-1] != eos:
                ids, mask = ids + [eos], mask + [True]
            full = len(ids)
            ids, mask, status = formats.truncate(ids, mask, self.cfg.seq_len, bos)
            labels = formats.labels_from(ids, mask, self.cfg.train_on_prompt)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_target"].append(sum(mask))
            out["status"].append(status)
            out["full_len"].append(full)
        return out

    def _text(self, texts: list[str]) -> dict[str, list]:
        """Concatenate documents (each + EOS) and cut into ``seq_len`` blocks; loss on every token."""
        stream: list[int] = []
        for t in texts:
            stream += self.tok(t, add_special_tokens=True)["input_ids"] + [self.tok.eos_token_id]
        L = self.cfg.seq_len
        blocks = [stream[i: i + L] for i in range(0, len(stream), L)]
        blocks = [b for b in blocks if len(b) >= 2]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks], "n_target": [len(b) for b in blocks],
                "status": [0] * len(blocks), "full_len": [len(b) for b in blocks]}


def _code_version() -> str:
    """Hash of the rendering code (dill pickles our classes by reference, so their code is not hashed)."""
    import hashlib
    import inspect
    import sys

    src = inspect.getsource(formats) + inspect.getsource(sys.modules[__name__])
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _tokenize(ds: "Dataset", fn: _Tokenize, cfg: "DataConfig") -> "Dataset":
    return ds.map(fn, batched=True, batch_size=256, remove_columns=ds.column_names, num_proc=cfg.num_proc,
                  desc="tokenizing")


def _limit(ds: "Dataset", max_samples: int | None, seed: int) -> "Dataset":
    if max_samples is None or max_samples >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(max_samples))


def _finish(ds: "Dataset") -> "Dataset":
    return ds.select_columns(["input_ids", "labels"])


def _namer(path: str, ds: "Dataset"):
    def where(i: int | None) -> str:
        return record_line(path, i) if i is not None else path
    return where


def _stats(ds: "Dataset", n_records: int, eos_id: int | None) -> DataStats:
    """Counts over the tokenized rows; ``eos_id=None`` skips the EOS check (text blocks end anywhere)."""
    ids = ds["input_ids"]
    status = Counter(ds["status"])
    return DataStats(
        records=n_records, sequences=len(ds), prompt_truncated=status[1], answer_truncated=status[2],
        lengths=[len(x) for x in ids], trainable_tokens=list(ds["n_target"]),
        missing_eos=0 if eos_id is None else sum(1 for x in ids if not x or x[-1] != eos_id),
        duplicates=len(ids) - len({tuple(x) for x in ids}),
    )
