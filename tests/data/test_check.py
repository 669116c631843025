"""data-check: the report's numbers on the real GSM8K files and on the built-in demo; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_trainer.cli import main
from qlora_trainer.config import load_config
from qlora_trainer.data.check import check_data, render_masked
from qlora_trainer.runtime import data_root

REPO = Path(__file__).resolve().parents[2]
HAVE_GSM8K = (data_root() / "gsm8k" / "train.jsonl").is_file() and (data_root() / "llama2-tokenizer").is_dir()


def test_render_masked_marks_no_loss_spans(tokenizer):
    ids = list(b"Q: hi A: yo")
    labels = [-100] * 6 + ids[6:]
    assert render_masked(tokenizer, ids, labels) == "[[Q: hi ]]A: yo"


def test_demo_report(tokenizer):
    r = check_data(load_config(None), tokenizer, seed=0)  # default data.seq_len=512
    assert (r["records"], r["train_sequences"], r["eval_sequences"]) == (600, 600, 0)
    assert r["prompt_truncated"] == r["answer_truncated"] == r["missing_eos"] == r["zero_trainable_tokens"] == 0
    assert r["duplicates"] > 0  # 3 tasks x 21 words = 63 distinct records among 600
    assert r["first_sample"].startswith("[[Below is an instruction") and r["first_sample"].endswith("</s>")


@pytest.mark.skipif(not HAVE_GSM8K, reason="needs $QLORA_DATA/gsm8k and llama2-tokenizer")
def test_data_check_real_gsm8k(capsys):
    assert main(["data-check", str(REPO / "configs" / "gsm8k.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["records"], r["train_sequences"], r["eval_sequences"]) == (7473, 7473, 1319)
    assert r["format"] == "instruction" and r["seq_len"] == 512
    p = r["length_percentiles"]
    assert 150 < p["p50"] < 300 and p["p0"] < p["p50"] < p["p90"] < p["p100"] <= 512
    assert 0 < r["prompt_truncated"] < 50 and r["answer_truncated"] == 0  # a few long questions lose prompt
    assert r["zero_trainable_tokens"] == r["missing_eos"] == r["duplicates"] == 0
    assert 0.4 < r["trainable_tokens"] / r["tokens"] < 0.7  # the answers carry the loss, not the prompts
    first = r["first_sample"]
    assert first.startswith("[[Below is an instruction") and "Natalia sold clips" in first.split("]]")[0]
    assert first.split("]]", 1)[1].startswith("Natalia sold 48/2") and first.endswith("#### 72</s>")


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {bad}}}\n", encoding="utf-8")
    assert main(["data-check", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {bad}:2: invalid JSON")


@pytest.mark.skipif(not (data_root() / "tinyshakespeare" / "input.txt").is_file(), reason="needs tinyshakespeare")
def test_data_check_tinyshakespeare_text_blocks(tokenizer):
    cfg = load_config(REPO / "configs" / "tinyshakespeare.yaml")
    r = check_data(cfg, tokenizer, seed=cfg.train.seed)
    n_bytes = len((data_root() / "tinyshakespeare" / "input.txt").read_bytes())
    assert r["records"] == 1 and r["tokens"] < n_bytes  # one document; held-out blocks are not counted
    blocks = -(-(n_bytes + 1) // 256)  # byte tokens + EOS, cut into 256-token blocks
    assert r["train_sequences"] + r["eval_sequences"] == blocks
    assert r["eval_sequences"] == round(blocks * 0.05)
    assert r["trainable_tokens"] == r["tokens"] and r["length_percentiles"]["p50"] == 256
    assert "[[" not in r["first_sample"] and len(r["first_sample"]) == 256  # no masked span; 1 byte = 1 token
