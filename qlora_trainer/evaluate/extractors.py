"""Answer extractors and exact-match scoring for generation tasks.

An extractor turns free text (a model's completion, or a dataset's reference answer) into the short
answer that is compared: ``extract(text) -> str | None`` (``None``: no answer found, which never
matches). Both sides go through the same extractor, so ``"#### 1,000"`` and ``"The answer is 1000."``
compare equal under ``gsm8k``.

Built in:

* ``gsm8k``: the number after the first ``####`` (GSM8K's answer line); without one, the last number
  in the text (what a model that skips the marker usually means). Numbers are normalised: thousands
  commas, a leading ``$``, a trailing ``.`` and trailing zeros after the point are dropped.
* ``last_number``: the last number in the text, normalised.
* ``first_line``: the first non-empty line, stripped (short free-text answers).
* ``exact``: the whole text, stripped.

Register others with :func:`register_extractor` (a name -> callable), then name them in a task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qlora_trainer.errors import QloraError

Extractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_GSM8K_MARK = re.compile(r"####\s*(" + _NUMBER.pattern + ")")


def normalize_number(text: str) -> str:
    """``"$1,000.50"`` -> ``"1000.5"``, ``"-3.0"`` -> ``"-3"``, ``".5"`` -> ``"0.5"``."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    neg = s.startswith("-")
    s = s.lstrip("-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return f"-{s}" if neg and s != "0" else s


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised (None when there is none)."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_answer(text: str) -> str | None:
    """The number after GSM8K's ``####`` marker, else the last number in the text."""
    m = _GSM8K_MARK.search(text)
    return normalize_number(m.group(1)) if m else last_number(text)


def first_line(text: str) -> str | None:
    """The first non-empty line, stripped."""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), None)


def exact(text: str) -> str | None:
    """The whole text, stripped (None when empty)."""
    return text.strip() or None


EXTRACTORS: dict[str, Extractor] = {"gsm8k": gsm8k_answer, "last_number": last_number,
                                    "first_line": first_line, "exact": exact}


def register_extractor(name: str, fn: Extractor) -> None:
    """Make ``fn`` available to tasks as ``extractor: name`` (replaces an existing one)."""
    EXTRACTORS[name] = fn


def get_extractor(name: str) -> Extractor:
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise QloraError(f"unknown answer extractor {name!r}; known: {', '.join(EXTRACTORS)} "
                         f"(add one with qlora_trainer.evaluate.register_extractor)") from None


@dataclass(frozen=True)
class Scored:
    """One prediction compared with its reference."""

    predicted: str | None
    """The extracted predicted answer (None: none found)."""
    reference: str | None
    """The extracted reference answer."""
    correct: bool


def score_one(prediction: str, reference: str, extractor: str | Extractor = "gsm8k") -> Scored:
    """Extract both answers with the same extractor; correct when both exist and are equal."""
    fn = get_extractor(extractor) if isinstance(extractor, str) else extractor
    p, r = fn(prediction), fn(reference)
    return Scored(p, r, p is not None and r is not None and p == r)


def exact_match(predictions: Iterable[str], references: Iterable[str],
                extractor: str | Extractor = "gsm8k") -> tuple[float, list[Scored]]:
    """(share of predictions whose answer equals the reference's, per-sample results)."""
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    scored = [score_one(p, r, extractor) for p, r in zip(preds, refs)]
    return (sum(s.correct for s in scored) / len(scored) if scored else 0.0), scored
