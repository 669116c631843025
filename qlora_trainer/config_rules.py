"""The allowed values of every config field, in one table (:data:`RULES`).

``Config.validate`` checks each field against its rule at load time (before anything heavy is
imported) and ``--help-config`` appends each rule's description to the field's documentation, so the
range a user reads is the range that is enforced. Besides its rule, every float must be finite
(``nan``/``inf`` pass YAML and Python comparisons in surprising ways). A field whose annotation is
``X | None`` accepts ``None`` as well (its documentation says what ``None`` means).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A number in an interval (``None``: unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: Any) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a few listed values."""

    values: tuple[Any, ...]

    def ok(self, v: Any) -> bool:
        return v in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Pattern:
    """A string matching ``regex`` (fully); ``text`` says what that means to a user."""

    regex: str
    text: str

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class WordOrRange:
    """One of a few words, or an integer in ``range``."""

    words: tuple[str, ...]
    range: Range

    def ok(self, v: Any) -> bool:
        if isinstance(v, str):
            return v in self.words
        return isinstance(v, int) and not isinstance(v, bool) and self.range.ok(v)

    def describe(self) -> str:
        return f"{', '.join(self.words)} or an integer {self.range.describe()}"


NONEMPTY = Pattern(r"(?s)\s*\S.*", "a non-empty string")
AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)

RULES: dict[str, Any] = {
    "performance.checkpoint_layers": WordOrRange(("auto", "all"), AT_LEAST_0),
    "model.name_or_path": NONEMPTY,
    "model.tokenizer": NONEMPTY,
    "performance.mlp_chunk_tokens": AT_LEAST_0,
    "quantization.blocksize": OneOf((64, 128, 256, 512, 1024, 2048, 4096)),
    "lora.r": AT_LEAST_1,
    "lora.alpha": POSITIVE,
    "lora.dropout": FRACTION,
    "lora.loraplus_ratio": POSITIVE,
    "lora.loftq_iters": AT_LEAST_1,
    "lora.adalora.target_r": AT_LEAST_1,
    "lora.adalora.tinit": AT_LEAST_0,
    "lora.adalora.tfinal": AT_LEAST_0,
    "lora.adalora.delta_t": AT_LEAST_1,
    "lora.adalora.beta1": Range(0, 1, lo_open=True, hi_open=True),
    "lora.adalora.beta2": Range(0, 1, lo_open=True, hi_open=True),
    "lora.adalora.orth_reg_weight": AT_LEAST_0,
    "data.path": NONEMPTY,
    "data.seq_len": Range(8),
    "data.eval_fraction": FRACTION,
    "data.max_samples": AT_LEAST_1,
    "data.num_proc": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1,
    "train.epochs": POSITIVE,
    "train.lr": POSITIVE,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.weight_decay": AT_LEAST_0,
    "train.warmup_steps": AT_LEAST_0,
    "train.max_grad_norm": AT_LEAST_0,
    "train.seed": Range(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "train.save_every": AT_LEAST_0,
    "eval.every": AT_LEAST_0,
    "eval.batches": AT_LEAST_0,
    "eval.limit": AT_LEAST_0,
    "eval.max_new_tokens": AT_LEAST_0,
    "performance.loss_chunk_size": AT_LEAST_0,
    "train.skip_bad_steps": AT_LEAST_0,
    "train.device": Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N (N a GPU index)"),
    "preference.beta": POSITIVE,
    "preference.label_smoothing": Range(0, 0.5, hi_open=True),
    "preference.simpo_gamma": AT_LEAST_0,
    "preference.simpo_nll_weight": AT_LEAST_0,
    "preference.desirable_weight": AT_LEAST_0,
    "preference.undesirable_weight": AT_LEAST_0,
    "grpo.num_generations": Range(2),
    "grpo.max_completion_length": AT_LEAST_1,
    "grpo.temperature": POSITIVE,
    "grpo.top_p": Range(0, 1, lo_open=True),
    "grpo.beta": AT_LEAST_0,
    "grpo.epsilon": Range(0, 1, lo_open=True, hi_open=True),
    "grpo.epsilon_high": POSITIVE,
    "output.log_every": AT_LEAST_1,
    "output.keep_last": AT_LEAST_1,
    "output_dir": NONEMPTY,
    "resume": NONEMPTY,
}


def describe(key: str) -> str | None:
    """``Allowed: ...`` text for ``key`` (None when it has no rule)."""
    rule = RULES.get(key)
    return None if rule is None else f"Allowed: {rule.describe()}."


def problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``key`` (None: it is)."""
    if value is None:
        return None  # the type check already decided whether None is allowed
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, list) and not value:
        return "must not be empty"
    rule = RULES.get(key)
    if rule is None or rule.ok(value):
        return None
    return f"must be {rule.describe()}"
