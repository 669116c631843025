"""``builtin:demo``: a small generated instruction dataset (no download, deterministic).

Three questions about a word with short answers from a closed set (``yes``/``no``, a letter count,
a category). The answers are a few byte tokens in fixed patterns, so a tiny random model's LoRA
adapter drives the completion loss clearly down within a few dozen steps on the CPU (first the answer
vocabulary and EOS, then the word -> answer rules).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

CATEGORIES = {
    "animal": ("cat", "dog", "fish", "bird", "horse", "mouse", "goat"),
    "nature": ("sun", "tree", "moon", "rain", "star", "lake", "rock", "leaf"),
    "food": ("milk", "bread", "apple", "rice", "cake", "soup"),
}
WORDS = tuple(w for ws in CATEGORIES.values() for w in ws)
_CATEGORY = {w: c for c, ws in CATEGORIES.items() for w in ws}

TASKS = (
    ("Does the word contain the letter a? Answer yes or no.", lambda w: "yes" if "a" in w else "no"),
    ("How many letters does the word have?", lambda w: str(len(w))),
    ("Is the word an animal, nature or food?", lambda w: _CATEGORY[w]),
)


def demo_records(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """``n`` alpaca-style records ``{instruction, input, output}``, the same for the same ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        instruction, fn = TASKS[rng.randrange(len(TASKS))]
        word = WORDS[rng.randrange(len(WORDS))]
        out.append({"instruction": instruction, "input": word, "output": fn(word)})
    return out


def demo_dataset(n: int = 600, seed: int = 0) -> "Dataset":
    import datasets

    return datasets.Dataset.from_list(demo_records(n, seed))
