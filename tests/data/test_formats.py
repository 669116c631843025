"""Exact label positions of every format's loss mask on hand-built samples (byte tokenizer: 1 char = 1 id);
chat data (ShareGPT, OpenAI messages) through the named templates, the marker check (refuse / add / split)
on the byte and the real Llama-2 tokenizer, the BOS warning."""

from __future__ import annotations

import json
import logging

import pytest

from qlora_trainer.config import DataConfig
from qlora_trainer.data import IGNORE_INDEX, build_datasets
from qlora_trainer.data.formats import ALPACA, CHAT_TEMPLATES, truncate
from qlora_trainer.data.templates import resolve_chat_template, split_markers, template_markers
from qlora_trainer.errors import DataError
from qlora_trainer.runtime import data_root

BOS, EOS = 257, 258
LLAMA2_TOK = data_root() / "llama2-tokenizer"


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


def _trained(row) -> list[tuple[int, int]]:
    return [(i, t) for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]


def test_sharegpt_llama2_renders_and_trains_only_gpt_turns(tmp_path, tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "z"}]
    (row,) = _build(tokenizer, _write(tmp_path, [{"conversations": conv}]), format="sharegpt", chat_template="llama-2")
    u1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]"
    want = [BOS] + _ids(u1) + _ids(" yo ") + [EOS] + [BOS] + _ids("[INST] x [/INST]") + _ids(" z ") + [EOS]
    assert row["input_ids"] == want  # <s> / </s> are single special tokens; no extra EOS appended
    a1 = 1 + len(u1)
    a2 = a1 + 5 + 1 + len("[INST] x [/INST]")
    expect = [(a1 + k, t) for k, t in enumerate(_ids(" yo ") + [EOS])] + \
        [(a2 + k, t) for k, t in enumerate(_ids(" z ") + [EOS])]
    assert _trained(row) == expect


def test_openai_messages_mistral_with_content_parts(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "weight": 1}]
    (row,) = _build(tokenizer, _write(tmp_path, [{"messages": msgs}]), format="chat", chat_template="mistral")
    prompt = "[INST] S\n\nab [/INST]"
    assert row["input_ids"] == [BOS] + _ids(prompt) + _ids("c") + [EOS]
    assert _trained(row) == [(1 + len(prompt), ord("c")), (2 + len(prompt), EOS)]


def test_sharegpt_bad_role_names_the_line(tmp_path, tokenizer):
    path = _write(tmp_path, [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                             {"conversations": [{"from": "bot", "value": "a"}]}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'conversations' turn 0: 'from' is 'bot'"):
        _build(tokenizer, path, format="sharegpt", chat_template="llama-2")


def test_markers_not_tokens_are_refused_by_default(tmp_path, tokenizer):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError) as e:
        _build(tokenizer, path, format="chat", chat_template="llama-3")
    msg = str(e.value)
    assert "\n" not in msg and "'<|start_header_id|>'" in msg and "splits into 19 pieces" in msg
    assert "data.marker_tokens=add" in msg and "data.marker_tokens=split" in msg


def test_marker_tokens_add_makes_each_marker_one_token(tmp_path, tokenizer):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    (row,) = _build(tokenizer, path, format="chat", chat_template="chatml", marker_tokens="add")
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (260, 261) and len(tokenizer) == 262
    assert row["input_ids"] == [start] + _ids("user\na") + [end] + _ids("\n") + [start] + _ids("assistant\nb") + \
        [end] + _ids("\n") + [EOS]
    assert [t for _, t in _trained(row)] == [ord("b"), end, EOS]  # the end marker is learned as one token


@pytest.mark.skipif(not (LLAMA2_TOK / "tokenizer.json").is_file(), reason="needs $QLORA_DATA/llama2-tokenizer")
def test_real_llama2_tokenizer_chatml_refused_llama2_template_works(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(LLAMA2_TOK))
    tok.pad_token = tok.unk_token
    assert split_markers(tok, template_markers(CHAT_TEMPLATES["chatml"], "chatml")) == {"<|im_start|>": 7,
                                                                                        "<|im_end|>": 7}
    with pytest.raises(DataError, match=r"marker '<\|im_start\|>' of 'chatml' is not one token .* 7 pieces"):
        resolve_chat_template(tok, "chatml", "require")
    conv = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]
    (row,) = _build(tok, _write(tmp_path, [{"conversations": conv}]), format="sharegpt", chat_template="llama-2")
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"][-1] == tok.eos_token_id
    trained = [t for _, t in _trained(row)]
    assert tok.decode(trained).strip() == "4 </s>" or tok.decode(trained, skip_special_tokens=True).strip() == "4"
    assert trained[-1] == tok.eos_token_id and tok.bos_token_id not in trained
    _, added = resolve_chat_template(tok, "chatml", "add")
    assert added == [32000, 32001] and split_markers(tok, ["<|im_start|>", "<|im_end|>"]) == {}


def test_bos_warning_when_template_expects_one_and_tokenizer_has_none(tokenizer, caplog):
    tokenizer.bos_token = None
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.data.templates"):
        resolve_chat_template(tokenizer, "llama-2", "require")
        resolve_chat_template(tokenizer, "chatml", "split")
    bos = [r.getMessage() for r in caplog.records if "BOS" in r.getMessage()]
    assert len(bos) == 1 and "'llama-2'" in bos[0]


@pytest.mark.skipif(not (LLAMA2_TOK / "tokenizer.json").is_file(), reason="needs $QLORA_DATA/llama2-tokenizer")
def test_bos_warning_when_tokenizer_adds_bos_but_template_renders_none(caplog):
    from transformers import AutoTokenizer

    from qlora_trainer.data.templates import check_bos

    tok = AutoTokenizer.from_pretrained(str(LLAMA2_TOK))
    assert check_bos(tok, CHAT_TEMPLATES["chatml"])  # this tokenizer adds no BOS itself: nothing expected
    tok.add_bos_token = True  # as Llama-2's hub tokenizer does
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.data.templates"):
        assert not check_bos(tok, CHAT_TEMPLATES["chatml"], "'chatml'")
        assert check_bos(tok, CHAT_TEMPLATES["llama-2"], "'llama-2'")
    assert [r.getMessage() for r in caplog.records] == [
        "data.chat_template: the tokenizer adds BOS '<s>' to plain text but 'chatml' renders none; chat samples "
        "will start without it (pick a template that starts with {{ bos_token }})"]


@pytest.mark.parametrize("template", ["chatml", "llama-2", "llama-3", "mistral", "diffed"])
def test_openai_weight_0_turn_is_shown_not_trained(tmp_path, tokenizer, template):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "AAA", "weight": 0},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "BBB", "weight": 1}]
    kw = {"chat_template": template}
    if template == "diffed":  # the tokenizer's own template without generation blocks
        tokenizer.chat_template = CHAT_TEMPLATES["chatml"].replace("{% generation %}", "").replace(
            "{% endgeneration %}", "")
        kw = {}
    (row,) = _build(tokenizer, _write(tmp_path, [{"messages": msgs}]), format="chat", marker_tokens="split", **kw)
    shown = tokenizer.decode(row["input_ids"])
    trained = tokenizer.decode([t for _, t in _trained(row)])
    assert "AAA" in shown and "BBB" in shown
    assert "BBB" in trained and "AAA" not in trained


def test_tokenizers_own_template_markers_are_checked_too(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]  # e.g. a hub tokenizer's ChatML template
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"marker '<\|im_start\|>' of the chat template is not one token"):
        _build(tokenizer, path, format="chat")
