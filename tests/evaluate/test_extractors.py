"""Exact-match scoring on hand-made predictions: GSM8K's ``####`` answers, number normalisation,
the fallback to the last number, pluggable extractors and task specs."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.errors import QloraError
from qlora_trainer.evaluate import exact_match, gsm8k_answer, register_extractor, resolve_task, score_one
from qlora_trainer.evaluate.extractors import EXTRACTORS, last_number, normalize_number
from qlora_trainer.evaluate.tasks import load_examples
from qlora_trainer.runtime import data_root

REFERENCE = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize("text,expected", [
    ("$1,000.50", "1000.5"), ("-3.0", "-3"), (".5", "0.5"), ("007", "7"), ("18.", "18"), ("-0", "0"),
    ("1,234", "1234"), ("2.250", "2.25"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gsm8k_answer_takes_the_marker_then_the_last_number():
    assert gsm8k_answer(REFERENCE) == "18"
    assert gsm8k_answer("so 5 + 7 = 12\n#### 12\n### Instruction: 99") == "12"   # marker beats later numbers
    assert gsm8k_answer("#### $1,200") == "1200"
    assert gsm8k_answer("She pays 3 and then 42 dollars") == "42"               # no marker: last number
    assert gsm8k_answer("no digits here") is None
    assert last_number("x = -2.50 and y = 4") == "4"


def test_exact_match_on_hand_made_predictions():
    refs = [REFERENCE, "#### 3", "#### 70000", "#### 540", "#### 20"]
    preds = [
        "9 eggs * $2 = $18\n#### 18",          # right, with the marker
        "It takes 3 bolts.",                  # right, no marker (last number)
        "#### 70,000.00",                     # right after normalisation
        "#### 54",                            # wrong
        "I do not know",                      # no answer: never correct
    ]
    acc, scored = exact_match(preds, refs)
    assert [s.correct for s in scored] == [True, True, True, False, False]
    assert acc == pytest.approx(3 / 5)
    assert scored[3].predicted == "54" and scored[3].reference == "540"
    assert scored[4].predicted is None
    assert exact_match([], [])[0] == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_other_extractors_and_a_registered_one():
    assert score_one("  Paris \nand more", "Paris", "first_line").correct
    assert not score_one("Paris is nice", "Paris", "exact").correct
    assert score_one("", "", "exact").correct is False                      # empty never matches
    register_extractor("upper", lambda t: t.strip().upper() or None)
    try:
        assert score_one("paris", "PARIS", "upper").correct
        task = resolve_task("qa.jsonl@upper")
        assert task.extractor == "upper" and task.name == "qa"
    finally:
        EXTRACTORS.pop("upper")
    with pytest.raises(QloraError, match="unknown answer extractor 'nope'"):
        resolve_task("qa.jsonl@nope")
    with pytest.raises(QloraError, match="not a known task"):
        resolve_task("gsm9k")


def test_task_file_fields_and_gsm8k(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "2+2?", "answer": 4},
                                                           {"question": "3+3?", "answer": 6}]))
    task, ex = load_examples(resolve_task(f"{path}@last_number"), limit=1)
    assert (task.prompt_field, task.answer_field) == ("question", "answer")
    assert [(e.prompt, e.reference) for e in ex] == [("2+2?", "4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(QloraError, match="needs a prompt field"):
        load_examples(resolve_task(str(bad)))


@pytest.mark.skipif(not (data_root() / "gsm8k" / "test.jsonl").is_file(), reason="needs $QLORA_DATA/gsm8k")
def test_gsm8k_task_reads_the_shared_data():
    task, ex = load_examples(resolve_task("gsm8k"), limit=3)                 # $QLORA_DATA/gsm8k/test.jsonl
    assert task.extractor == "gsm8k" and len(ex) == 3 and gsm8k_answer(ex[0].reference) == "18"


def test_eval_tasks_are_checked_at_preflight(tmp_path):
    from qlora_trainer.config import ConfigError, config_from_dict
    from qlora_trainer.train.guards import preflight

    cfg = config_from_dict({"eval": {"tasks": ["gsm8k", "data/qa.jsonl@first_line"], "limit": 5}})
    assert cfg.validate().eval.tasks == ["gsm8k", "data/qa.jsonl@first_line"]
    preflight(cfg, tmp_path / "out")
    bad = config_from_dict({"eval": {"tasks": ["gsm9k"]}}).validate()  # the config alone is fine
    with pytest.raises(ConfigError, match="eval.tasks: eval task 'gsm9k'"):
        preflight(bad, tmp_path / "out")
    with pytest.raises(ConfigError, match="eval.tasks: not supported with train.distributed=fsdp"):
        config_from_dict({"eval": {"tasks": ["gsm8k"]}, "train": {"distributed": "fsdp"},
                          "quantization": {"quant_storage": "float32"}}).validate()
    with pytest.raises(ConfigError, match="eval.limit: must be >= 0"):
        config_from_dict({"eval": {"limit": -1}}).validate()
