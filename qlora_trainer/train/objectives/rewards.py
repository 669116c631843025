"""GRPO reward functions: built-ins and the user's, named in ``grpo.rewards``.

A reward function is called as TRL calls them::

    fn(prompts=list[str], completions=list[str], **columns) -> list[float | None]

with one entry per completion; ``columns`` are the dataset's other columns, repeated per
completion (e.g. ``answer``). ``None`` = not scored by this function. Names:

* ``gsm8k_exact``: 1.0 when the completion's answer (after ``####``, else its last number) equals
  the ``answer`` column's, else 0.0.
* ``gsm8k_format``: 1.0 when the completion ends its reasoning with a ``#### <number>`` line.
* ``answer_chars``: the share of the completion's characters (first line) that occur in the
  ``answer`` column: a shaped reward a tiny random model can climb (the CPU demo's).
* ``module:function`` (an importable module) or ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_trainer.errors import ConfigError
from qlora_trainer.evaluate.extractors import score_one

RewardFn = Callable[..., list]
_FORMAT = re.compile(r"####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")


def gsm8k_exact(prompts: list[str], completions: list[str], answer: list[str] | None = None,
                **_: Any) -> list[float]:
    """1.0 where the completion's GSM8K answer equals the reference ``answer`` column's."""
    if answer is None:
        raise ConfigError("grpo.rewards: gsm8k_exact needs an 'answer' column in the data")
    return [float(score_one(c, a, "gsm8k").correct) for c, a in zip(completions, answer)]


def gsm8k_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion ends with a ``#### <number>`` line."""
    return [float(bool(_FORMAT.search(c.strip()))) for c in completions]


def answer_chars(prompts: list[str], completions: list[str], answer: list[str] | None = None,
                 **_: Any) -> list[float]:
    """Share of the completion's first-line characters that occur in its ``answer``."""
    if answer is None:
        raise ConfigError("grpo.rewards: answer_chars needs an 'answer' column in the data")
    out = []
    for c, a in zip(completions, answer):
        line = c.split("\n", 1)[0]
        out.append(sum(ch in a for ch in line) / len(line) if line else 0.0)
    return out


BUILTIN: dict[str, RewardFn] = {"gsm8k_exact": gsm8k_exact, "gsm8k_format": gsm8k_format, "answer_chars": answer_chars}


def load_reward(spec: str) -> RewardFn:
    """A built-in name, ``module:function`` or ``file.py:function`` -> the function. ConfigError
    (one line, naming ``grpo.rewards``) when it cannot be found."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"grpo.rewards: {spec!r} is not a built-in ({', '.join(BUILTIN)}) nor "
                          "module:function / file.py:function")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"grpo.rewards: {spec!r}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_qlora_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # the user's own reward code, named in their config
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"grpo.rewards: {spec!r}: cannot import {where!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {spec!r}: {where} has no function {attr!r}")
    return fn


def score(fns: list[RewardFn], weights: list[float], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[list[float], list[list[float]]]:
    """Weighted sum of every function's rewards per completion (a ``None`` counts 0) and each
    function's own rewards (None -> nan) for the metrics."""
    per_fn = []
    for fn in fns:
        out = fn(prompts=prompts, completions=completions, **columns)
        if len(out) != len(completions):
            raise ConfigError(f"grpo.rewards: {getattr(fn, '__name__', fn)} returned {len(out)} rewards for "
                              f"{len(completions)} completions")
        per_fn.append([float("nan") if r is None else float(r) for r in out])
    total = [sum(w * (0.0 if r != r else r) for w, r in zip(weights, rs)) for rs in zip(*per_fn)]
    return total, per_fn


def reward_metrics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums of each reward (and of its square, for the std) over the rows, nan (unscored) as 0."""
    out = {}
    for k, v in batch.items():
        if k == "reward" or k.startswith("reward/"):
            v = torch.nan_to_num(v.float(), nan=0.0)
            out[k] = v.sum()
            out[f"{k}_sq"] = (v * v).sum()
    return out


def finish_reward_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Means of ``reward``/``reward/<fn>`` and their squares -> TRL's names: ``reward``,
    ``reward_std``, ``rewards/<fn>/mean``, ``rewards/<fn>/std`` (std over the step's completions)."""
    for k in [k for k in metrics if k.endswith("_sq")]:
        base = k[:-3]
        mean, sq = metrics.pop(base), metrics.pop(k)
        std = math.sqrt(max(sq - mean * mean, 0.0))
        if base == "reward":
            metrics["reward"], metrics["reward_std"] = mean, std
        else:
            name = base.split("/", 1)[1]
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = mean, std
    return metrics


def reward_name(spec: str) -> str:
    """The metric name of a reward spec: the function's name."""
    return spec.rpartition(":")[2] or spec
