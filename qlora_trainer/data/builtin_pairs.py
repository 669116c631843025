"""Built-in preference datasets (``data.format: preference``), generated in code, no download.

* ``builtin:demo-pairs``: the demo questions (``demo.py``) with the right answer as ``chosen`` and
  another answer of the same kind as ``rejected``.
* ``builtin:demo-prompts`` (``data.format: prompt_only``): the demo questions with their
  ``answer`` column, for GRPO.
* ``builtin:gsm8k-pairs``: GSM8K training problems (``$QLORA_DATA/gsm8k/train.jsonl``) with the
  reference solution as ``chosen`` and a corrupted copy as ``rejected``: the numbers of the first
  reasoning line that has any, and the final answer, are shifted by a nonzero amount (seeded per
  record), so the two sides differ early (a long solution cut at ``seq_len`` still differs).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from qlora_trainer.data.demo import TASKS, WORDS, demo_records
from qlora_trainer.errors import DataError
from qlora_trainer.runtime import expand_path

if TYPE_CHECKING:
    from datasets import Dataset

GSM8K_PROMPT = "Question: {question}\nAnswer: "
_NUMBER = re.compile(r"\d+")
BUILTIN_PAIRS = ("builtin:demo-pairs", "builtin:gsm8k-pairs", "builtin:demo-prompts")


def demo_pairs(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """``{prompt, chosen, rejected}`` from the demo records; ``rejected`` is a wrong answer of the same task."""
    rng = random.Random(seed + 1)
    by_task = {instr: sorted({fn(w) for w in WORDS}) for instr, fn in TASKS}
    out = []
    for r in demo_records(n, seed):
        wrong = [a for a in by_task[r["instruction"]] if a != r["output"]]
        out.append({"prompt": f"{r['instruction']}\nInput: {r['input']}\nOutput: ", "chosen": r["output"],
                    "rejected": wrong[rng.randrange(len(wrong))]})
    return out


def corrupt_solution(answer: str, rng: random.Random) -> str:
    """A wrong GSM8K solution: every number of the first reasoning line that has one and the
    ``#### N`` answer shifted by the same ``k`` in [1, 9]."""
    body, _, final = answer.rpartition("####")
    lines = body.rstrip("\n").split("\n")
    k = rng.randint(1, 9)

    def shift(m: re.Match) -> str:
        return str(int(m.group()) + k)

    i = next((j for j, ln in enumerate(lines) if _NUMBER.search(ln)), len(lines) - 1)
    lines[i] = _NUMBER.sub(shift, lines[i])
    return "\n".join(lines) + "\n####" + _NUMBER.sub(shift, final, count=1)


def gsm8k_pairs(path: str = "$QLORA_DATA/gsm8k/train.jsonl", seed: int = 0) -> list[dict[str, str]]:
    """``{prompt, chosen, rejected}`` for every GSM8K record of ``path``."""
    import json
    from pathlib import Path

    p = Path(expand_path(path))
    if not p.is_file():
        raise DataError(f"builtin:gsm8k-pairs: {p} not found (set $QLORA_DATA to the shared data directory)")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        rec = json.loads(line)
        rng = random.Random(seed * 1_000_003 + i)
        out.append({"prompt": GSM8K_PROMPT.format(question=rec["question"]), "chosen": rec["answer"],
                    "rejected": corrupt_solution(rec["answer"], rng)})
    return out


def builtin_pairs(name: str) -> "Dataset":
    import datasets

    if name == "builtin:demo-prompts":
        rows = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in demo_pairs()]
    else:
        rows = demo_pairs() if name == "builtin:demo-pairs" else gsm8k_pairs()
    return datasets.Dataset.from_list(rows)
