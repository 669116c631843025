"""Every kind of bad data is a one-line DataError naming file, line and field, before any training."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.config import DataConfig
from qlora_trainer.data import build_datasets
from qlora_trainer.errors import DataError


def _jsonl(tmp_path, lines: list[str], name="bad.jsonl") -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def _err(tokenizer, **kw) -> str:
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(**kw), tokenizer, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


GOOD = json.dumps({"instruction": "a", "output": "b"})


def test_corrupt_json_line(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [GOOD, GOOD, '{"instruction": "a", "output": '])
    assert _err(tokenizer, path=path).startswith(f"{path}:3: invalid JSON")


def test_missing_field_names_column_and_mapping(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [json.dumps({"question": "q", "answer": "a"})])
    msg = _err(tokenizer, path=path)
    assert "'instruction'" in msg and "question" in msg and "data.fields.instruction" in msg


def test_null_field_names_line(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [GOOD, "", json.dumps({"instruction": "a", "output": None})])
    assert _err(tokenizer, path=path) == f"{path}:3: field 'output' is missing or null"


def test_wrong_type(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [json.dumps({"instruction": "a", "output": 5})])
    assert _err(tokenizer, path=path) == f"{path}:1: field 'output' must be a string, got int"


def test_mixed_types_across_lines(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [GOOD, json.dumps({"instruction": ["x"], "output": "b"})])
    msg = _err(tokenizer, path=path)
    assert msg.startswith(f"{path}:2: field 'instruction' is list here but str on line 1")


def test_empty_dataset(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    assert "empty" in _err(tokenizer, path=str(tmp_path / "e.jsonl"))


def test_non_utf8_text(tmp_path, tokenizer):
    p = tmp_path / "t.txt"
    p.write_bytes(b"line one\nline \xff two\n")
    assert _err(tokenizer, path=str(p), format="text").startswith(f"{p}:2: not valid UTF-8")
    q = tmp_path / "t.jsonl"
    q.write_bytes(GOOD.encode() + b"\n" + b'{"instruction": "\xfe", "output": "b"}\n')
    assert _err(tokenizer, path=str(q)).startswith(f"{q}:2: not valid UTF-8")


def test_chat_without_assistant_turn(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    msg = _err(tokenizer, path=path, format="chat", chat_template="chatml")
    assert msg == f"{path}:1: field 'messages' has no assistant turn (nothing to train on)"


def test_chat_needs_a_template(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [json.dumps({"messages": [{"role": "assistant", "content": "hi"}]})])
    assert "data.chat_template" in _err(tokenizer, path=path, format="chat")


def test_answer_longer_than_seq_len_is_cut_and_counted(tmp_path, tokenizer, caplog):
    from qlora_trainer.data import prepare

    path = _jsonl(tmp_path, [json.dumps({"prompt": "p", "completion": "x" * 30}),
                             json.dumps({"prompt": "p" * 30, "completion": "y"})])
    prep = prepare(DataConfig(path=path, format="prompt_completion", seq_len=10), tokenizer, seed=0)
    assert (prep.stats.answer_truncated, prep.stats.prompt_truncated, prep.stats.missing_eos) == (1, 1, 1)
    assert [len(r) for r in prep.train["input_ids"]] == [10, 10]
    with caplog.at_level("WARNING"):
        build_datasets(DataConfig(path=path, format="prompt_completion", seq_len=10), tokenizer, seed=0)
    assert "1 samples longer than seq_len=10 had their prompt cut" in caplog.text


def test_tokenizer_without_eos(tokenizer):
    tokenizer.eos_token = None
    assert "EOS" in _err(tokenizer, path="builtin:demo")


def test_missing_file_and_unknown_mapping(tmp_path, tokenizer):
    assert "data file not found" in _err(tokenizer, path=str(tmp_path / "nope.jsonl"))
    assert "not a field of format" in _err(tokenizer, path="builtin:demo", fields={"answer": "x"})
    assert "data.template" in _err(tokenizer, path="builtin:demo", template="{question}")


def test_hub_name_offline_is_one_line(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = _err(tokenizer, path="someone/no-such-dataset-xyz")
    assert msg.startswith("someone/no-such-dataset-xyz: not a local path and could not be loaded")
