"""Exact label positions of every format's loss mask on hand-built samples (byte tokenizer: 1 char = 1 id)."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.config import DataConfig
from qlora_trainer.data import IGNORE_INDEX, build_datasets
from qlora_trainer.data.formats import ALPACA, CHAT_TEMPLATES, truncate

EOS = 258


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def _ids(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def _build(tokenizer, path, **kw):
    train, _ = build_datasets(DataConfig(path=path, **kw), tokenizer, seed=0)
    return [train[i] for i in range(len(train))]


def test_instruction_custom_template_masks_prompt(tmp_path, tokenizer):
    path = _write(tmp_path, [{"instruction": "Add", "input": "1 2", "output": "3"}])
    (row,) = _build(tokenizer, path, template="Q:{instruction} {input}\nA:")
    prompt = "Q:Add 1 2\nA:"
    assert row["input_ids"] == _ids(prompt + "3") + [EOS]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + _ids("3") + [EOS]


def test_instruction_alpaca_and_field_mapping(tmp_path, tokenizer):
    path = _write(tmp_path, [{"question": "Why?", "answer": "Because."}])
    (row,) = _build(tokenizer, path, fields={"instruction": "question", "output": "answer"})
    prompt = ALPACA["no_input"].format(instruction="Why?")
    assert row["input_ids"] == _ids(prompt + "Because.") + [EOS]
    n = len(prompt)
    assert all(t == IGNORE_INDEX for t in row["labels"][:n])
    assert row["labels"][n:] == _ids("Because.") + [EOS]


def test_train_on_prompt_keeps_every_label(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "ab", "completion": "cd"}])
    (row,) = _build(tokenizer, path, format="prompt_completion", train_on_prompt=True)
    assert row["labels"] == row["input_ids"] == _ids("abcd") + [EOS]


def test_prompt_completion(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "2+2=", "completion": "4"}])
    (row,) = _build(tokenizer, path, format="prompt_completion")
    assert row["labels"] == [IGNORE_INDEX] * 4 + _ids("4") + [EOS]


def test_chat_chatml_fallback_trains_assistant_turns_only(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]
    path = _write(tmp_path, [{"messages": msgs}])
    # the byte tokenizer can only split the markers: say so (data.marker_tokens=split)
    (row,) = _build(tokenizer, path, format="chat", chat_template="chatml", marker_tokens="split")
    text = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nz<|im_end|>\n")
    assert row["input_ids"] == _ids(text) + [EOS]
    got = [(i, t) for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]
    a1 = text.index("yo<|im_end|>")
    a2 = text.index("z<|im_end|>")
    want = [(a1 + k, c) for k, c in enumerate(_ids("yo<|im_end|>"))] + \
        [(a2 + k, c) for k, c in enumerate(_ids("z<|im_end|>"))] + [(len(text), EOS)]
    assert got == want


def test_chat_template_without_generation_tags_is_diffed(tmp_path, tokenizer):
    # the tokenizer's own template (no {% generation %}) is rendered prefix by prefix and diffed
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"].replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _write(tmp_path, [{"messages": msgs}])
    (row,) = _build(tokenizer, path, format="chat", marker_tokens="split")
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    start = text.index("yo")
    assert row["input_ids"] == _ids(text) + [EOS]
    # the diff covers the assistant message and what the template appends after it ("<|im_end|>\n")
    assert row["labels"] == [IGNORE_INDEX] * start + _ids(text[start:]) + [EOS]


def test_text_is_chunked_with_loss_everywhere(tmp_path, tokenizer):
    p = tmp_path / "c.txt"
    p.write_text("abcdefghij" * 3, encoding="utf-8")
    rows = _build(tokenizer, str(p), format="text", seq_len=8)
    stream = _ids("abcdefghij" * 3) + [EOS]
    assert [r["input_ids"] for r in rows] == [stream[i:i + 8] for i in range(0, 31, 8)]
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_long_sample_cuts_prompt_from_left_keeping_answer(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "p" * 20, "completion": "ANSWER"}])
    (row,) = _build(tokenizer, path, format="prompt_completion", seq_len=10)
    assert row["input_ids"] == _ids("ppp" + "ANSWER") + [EOS]
    assert row["labels"] == [IGNORE_INDEX] * 3 + _ids("ANSWER") + [EOS]


def test_truncate_keeps_bos_then_cuts_answer_right():
    ids, mask = [1, 5, 5, 7, 7, 7], [False, False, False, True, True, True]
    assert truncate(ids, mask, 4, bos_id=1) == ([1, 7, 7, 7], [False, True, True, True], 1)
    assert truncate(ids, mask, 2, bos_id=1) == ([1, 7], [False, True], 2)
    assert truncate(ids, mask, 6, bos_id=1) == (ids, mask, 0)


def test_eval_fraction_and_max_samples_are_seeded(tokenizer):
    cfg = DataConfig(path="builtin:demo", eval_fraction=0.1, max_samples=100, seq_len=256)
    tr1, ev1 = build_datasets(cfg, tokenizer, seed=3)
    tr2, ev2 = build_datasets(cfg, tokenizer, seed=3)
    assert (len(tr1), len(ev1)) == (90, 10)
    assert tr1["input_ids"] == tr2["input_ids"] and ev1["input_ids"] == ev2["input_ids"]
    _, ev3 = build_datasets(cfg, tokenizer, seed=4)
    assert ev3["input_ids"] != ev1["input_ids"]


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_other_file_types(tmp_path, tokenizer, ext):
    import pandas as pd

    df = pd.DataFrame([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    p = tmp_path / f"d.{ext}"
    {"csv": lambda: df.to_csv(p, index=False), "parquet": lambda: df.to_parquet(p),
     "json": lambda: p.write_text(df.to_json(orient="records"))}[ext]()
    rows = _build(tokenizer, str(p), format="prompt_completion")
    assert sorted(r["input_ids"] for r in rows) == [_ids("ab") + [EOS], _ids("cd") + [EOS]]


def test_dataset_directory_with_split(tmp_path, tokenizer):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]),
        "test": datasets.Dataset.from_list([{"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    rows = _build(tokenizer, str(tmp_path / "ds"), format="prompt_completion", split="test")
    assert [r["input_ids"] for r in rows] == [_ids("cd") + [EOS], _ids("ef") + [EOS]]
