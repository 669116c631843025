"""Evaluation inside training (``eval.tasks``) equals ``qlora-trainer eval`` on the saved adapter:
the same completions per sample, the same exact-match, the same eval loss; ``--with-base`` scores the
adapter switched off on the same loaded model; the outputs are a JSONL of predictions and a summary."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.config import config_from_dict
from qlora_trainer.evaluate.extractors import EXTRACTORS, register_extractor

QA = [{"prompt": f"Add {a} and {b}.", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9)]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run with the QA task evaluated at steps 2 and 3 (the last)."""
    from qlora_trainer.train import train

    root = tmp_path_factory.mktemp("evalrun")
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA))
    cfg = config_from_dict({
        "model": {"name_or_path": "random:tiny", "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": "builtin:demo", "seq_len": 48, "max_samples": 40, "eval_fraction": 0.25,
                 "template": "{instruction}\nInput: {input}\nOutput: "},
        "train": {"max_steps": 3, "lr": 3e-3, "batch_size": 2, "grad_accum": 1, "seed": 0, "device": "cpu"},
        "eval": {"every": 2, "tasks": [f"{qa}@last_number"], "limit": 4, "max_new_tokens": 6},
        "output": {"progress_bar": False},
        "output_dir": str(root / "run"),
    }).validate()
    result = train(cfg)
    return root, qa, cfg, result


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_training_eval_equals_the_eval_command(trained, tmp_path, capsys):
    root, qa, cfg, result = trained
    rows = _jsonl(root / "run" / "metrics.jsonl")
    task_rows = [r for r in rows if "eval_qa_exact_match" in r]
    assert [r["step"] for r in task_rows] == [2, 3] and all(r["eval_qa_n"] == 4 for r in task_rows)
    in_training = _jsonl(root / "run" / "eval" / "step-000003" / "predictions.jsonl")
    assert len(in_training) == 4 and any(r["completion"] for r in in_training)

    out = tmp_path / "eval"
    rc = main(["eval", str(result.adapter_dir), "--task", f"{qa}@last_number", "--limit", "4",
               "--max-new-tokens", "6", "--perplexity", "--no-progress", "--output", str(out)])
    assert rc == 0
    command = _jsonl(out / "predictions.jsonl")
    assert [r["completion"] for r in command] == [r["completion"] for r in in_training]
    assert [r["correct"] for r in command] == [r["correct"] for r in in_training]
    summary = json.loads((out / "summary.json").read_text())
    label = summary["adapters"][0]
    assert summary["results"][label]["qa"]["exact_match"] == task_rows[-1]["eval_qa_exact_match"]
    assert summary["loss"][label]["split"] == "eval"
    assert summary["loss"][label]["loss"] == pytest.approx(result.eval_loss, rel=1e-6)
    assert "exact-match" in capsys.readouterr().out


def test_with_base_switches_the_adapter_off(trained, tmp_path):
    root, qa, cfg, result = trained
    register_extractor("first3", lambda t: t[:3] or None)   # pluggable: score on the first 3 characters
    try:
        out = tmp_path / "eval"
        assert main(["eval", str(result.adapter_dir), "--task", f"{qa}@first3", "--limit", "3",
                     "--max-new-tokens", "5", "--with-base", "--no-progress", "--output", str(out)]) == 0
    finally:
        EXTRACTORS.pop("first3")
    preds = _jsonl(out / "predictions.jsonl")
    by_model: dict[str, list[str]] = {}
    for r in preds:
        by_model.setdefault(r["model"], []).append(r["completion"])
    assert set(by_model) == {"base", "run"} and all(len(v) == 3 for v in by_model.values())
    assert by_model["base"] != by_model["run"]            # the trained adapter changes the answers
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"base", "run"}


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "notadapter").mkdir()
    assert main(["eval", str(tmp_path / "notadapter")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "notadapter"), "--task", "gsm9k"]) == 2      # checked before loading
    assert "eval task 'gsm9k': not a known task" in capsys.readouterr().err
