"""Which linear layers ``lora.targets`` selects: one name matcher for LoRA injection and the memory
estimate (torch-free, so ``qlora-trainer memory`` stays light)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from qlora_trainer.errors import ConfigError

ALL_LINEAR = "all-linear"


def select_targets(names: Iterable[str], targets: str | list[str], *,
                   output_names: Iterable[str] = ("lm_head",)) -> list[str]:
    """The qualified linear-layer ``names`` that ``targets`` selects, in order.

    ``all-linear``: every linear layer except the output projection (``output_names`` or any name
    ending in ``lm_head``). Otherwise each pattern selects a name that equals it, ends in
    ``.<pattern>`` (e.g. ``q_proj``) or fully matches it as a regular expression.
    """
    names = list(names)
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        skip = set(output_names)
        return [n for n in names if n not in skip and n.rsplit(".", 1)[-1] != "lm_head"]
    patterns = [targets] if isinstance(targets, str) else list(targets)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"lora.targets: {p!r} is not a valid pattern ({e})") from None
    return [n for n in names
            if any(n == p or n.endswith("." + p) or c.fullmatch(n) for p, c in zip(patterns, compiled))]
