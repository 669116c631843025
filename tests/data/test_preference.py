"""Preference data as TRL defines it: explicit / implicit prompts, plain and conversational, unpaired
and prompt-only; only completion tokens score; truncation counted per side; batches and KL rows."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import config_from_dict
from qlora_trainer.data import build_datasets, make_dataloader
from qlora_trainer.data.check import check_data
from qlora_trainer.data.preference import implicit_prompt
from qlora_trainer.errors import DataError
from qlora_trainer.models.tiny import byte_tokenizer


def _cfg(path, fmt="preference", objective="dpo", **data):
    return config_from_dict({"data": {"path": str(path), "format": fmt, "seq_len": 40, "chat_template": "chatml",
                                      "marker_tokens": "split", **data},
                             "train": {"objective": objective}}).validate()


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_implicit_prompt_as_trl():
    assert implicit_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    u = {"role": "user", "content": "q"}
    a, b = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    assert implicit_prompt([u, a], [u, b]) == ([u], [a], [b])


def test_pairs_score_completion_tokens_only(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five"},
                             {"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"}])
    tok = byte_tokenizer()
    train_ds, _ = build_datasets(_cfg(path).data, tok, seed=0)
    row = train_ds[0]
    for side, text in (("chosen", " 4"), ("rejected", " five")):
        scored = [t for t in row[f"{side}_labels"] if t != -100]
        assert tok.decode(scored) == text + tok.eos_token  # completion + EOS, never the prompt
    batch = next(iter(make_dataloader(train_ds, cfg=_cfg(path).data, tokenizer=tok, batch_size=2, shuffle=False,
                                      seed=0)))
    assert batch["input_ids"].shape[0] == 4  # [chosen x2; rejected x2]
    assert torch.equal(batch["input_ids"][0, :len(row["chosen_input_ids"])], torch.tensor(row["chosen_input_ids"]))
    assert torch.equal(batch["input_ids"][2, :len(row["rejected_input_ids"])], torch.tensor(row["rejected_input_ids"]))


def test_conversational_and_truncation_per_side(tmp_path):
    u = {"role": "user", "content": "x" * 60}
    path = _write(tmp_path, [{"chosen": [u, {"role": "assistant", "content": "ok"}],
                              "rejected": [u, {"role": "assistant", "content": "no way"}]}])
    tok = byte_tokenizer()
    report = check_data(_cfg(path), tok, seed=0)
    assert report["pairs"] == 1 and report["chosen"]["prompt_truncated"] == 1
    assert report["rejected"]["prompt_truncated"] == 1 and report["rejected"]["answer_truncated"] == 0
    assert "ok<|im_end|>" in report["first_chosen"] and "[[" in report["first_chosen"]
    assert report["chosen"]["length_percentiles"]["p100"] <= 40


def test_unpaired_batches_carry_labels_and_kl_rows(tmp_path):
    path = _write(tmp_path, [{"prompt": f"P{i}:", "completion": f" c{i}", "label": i % 2 == 0} for i in range(3)])
    tok = byte_tokenizer()
    cfg = _cfg(path, "unpaired", "kto")
    train_ds, _ = build_datasets(cfg.data, tok, seed=0)
    b = next(iter(make_dataloader(train_ds, cfg=cfg.data, tokenizer=tok, batch_size=3, shuffle=False, seed=0)))
    assert b["label"].tolist() == [1, 0, 1]
    kl_completion = [t for t in b["kl_labels"][1].tolist() if t != -100]
    own_previous = [t for t in b["labels"][0].tolist() if t != -100]
    assert kl_completion == own_previous  # prompt 1 with the completion of row 0
    assert b["kl_input_ids"][1, :3].tolist() == b["input_ids"][1, :3].tolist()


def test_prompt_only_keeps_extra_columns(tmp_path):
    path = _write(tmp_path, [{"prompt": "Say yes:", "answer": "yes"}, {"prompt": "Say no:", "answer": "no"}])
    cfg = config_from_dict({"data": {"path": str(path), "format": "prompt_only", "seq_len": 40},
                            "train": {"objective": "grpo"}, "grpo": {"rewards": ["gsm8k_exact"]}}).validate()
    train_ds, _ = build_datasets(cfg.data, byte_tokenizer(), seed=0)
    b = next(iter(make_dataloader(train_ds, cfg=cfg.data, tokenizer=byte_tokenizer(), batch_size=2, shuffle=False,
                                  seed=0)))
    assert b == {"prompt_text": ["Say yes:", "Say no:"], "answer": ["yes", "no"]}


def test_missing_column_and_objective_mismatch_are_one_line_errors(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match="field 'rejected' .*data.fields.rejected"):
        build_datasets(_cfg(path).data, byte_tokenizer(), seed=0)
    from qlora_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="train.objective: dpo needs data.format=preference"):
        config_from_dict({"data": {"format": "instruction"}, "train": {"objective": "dpo"}}).validate()
    with pytest.raises(ConfigError, match="data.format: preference data trains with a preference objective"):
        config_from_dict({"data": {"format": "preference"}}).validate()
