"""Chat data users bring: ShareGPT and OpenAI messages through the named templates, assistant-only
masks, the marker check (refuse / add / split) on the byte and the real Llama-2 tokenizer, BOS warning."""

from __future__ import annotations

import json
import logging

import pytest

from qlora_trainer.config import DataConfig
from qlora_trainer.data import IGNORE_INDEX, build_datasets
from qlora_trainer.data.templates import CHAT_TEMPLATES, resolve_chat_template, split_markers, template_markers
from qlora_trainer.errors import DataError
from qlora_trainer.runtime import data_root

BOS, EOS = 257, 258
LLAMA2_TOK = data_root() / "llama2-tokenizer"


def _write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def _ids(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def _rows(tokenizer, path, **kw):
    train, _ = build_datasets(DataConfig(path=path, **kw), tokenizer, seed=0)
    return [train[i] for i in range(len(train))]


def _trained(row) -> list[tuple[int, int]]:
    return [(i, t) for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]


def test_sharegpt_llama2_renders_and_trains_only_gpt_turns(tmp_path, tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "z"}]
    (row,) = _rows(tokenizer, _write(tmp_path, [{"conversations": conv}]), format="sharegpt", chat_template="llama-2")
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
    (row,) = _rows(tokenizer, _write(tmp_path, [{"messages": msgs}]), format="chat", chat_template="mistral")
    prompt = "[INST] S\n\nab [/INST]"
    assert row["input_ids"] == [BOS] + _ids(prompt) + _ids("c") + [EOS]
    assert _trained(row) == [(1 + len(prompt), ord("c")), (2 + len(prompt), EOS)]


def test_sharegpt_bad_role_names_the_line(tmp_path, tokenizer):
    path = _write(tmp_path, [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                             {"conversations": [{"from": "bot", "value": "a"}]}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'conversations' turn 0: 'from' is 'bot'"):
        _rows(tokenizer, path, format="sharegpt", chat_template="llama-2")


def test_markers_not_tokens_are_refused_by_default(tmp_path, tokenizer):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError) as e:
        _rows(tokenizer, path, format="chat", chat_template="llama-3")
    msg = str(e.value)
    assert "\n" not in msg and "'<|start_header_id|>'" in msg and "splits into 19 pieces" in msg
    assert "data.marker_tokens=add" in msg and "data.marker_tokens=split" in msg


def test_marker_tokens_add_makes_each_marker_one_token(tmp_path, tokenizer):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    (row,) = _rows(tokenizer, path, format="chat", chat_template="chatml", marker_tokens="add")
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
    (row,) = _rows(tok, _write(tmp_path, [{"conversations": conv}]), format="sharegpt", chat_template="llama-2")
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
