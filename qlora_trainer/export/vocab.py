"""A tokenizer in GGUF: llama.cpp's ``tokenizer.ggml.*`` keys.

Two kinds, as llama.cpp distinguishes them:

- SentencePiece (Llama-2, Mistral v0.1): ``tokenizer.ggml.model = "llama"``, the pieces, their scores
  and types read from ``tokenizer.model`` (a protobuf, parsed here: the ``sentencepiece`` package is
  not needed);
- byte-level BPE (Llama-3, Qwen2, GPT-2 style): ``tokenizer.ggml.model = "gpt2"``, the tokens by id,
  the merges, and ``tokenizer.ggml.pre`` naming llama.cpp's pre-tokenizer (recognised from the
  tokenizer's split regex; an unknown one falls back to ``default`` with a warning).

Token types follow SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte); ids between the tokenizer's size and the model's vocabulary are ``[PAD<i>]`` unused tokens.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_trainer.errors import QloraError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# split regexes of byte-level BPE tokenizers -> llama.cpp's pre-tokenizer names
PRE_TOKENIZERS: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
_GENERATION_TAG = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


@dataclass
class Vocab:
    """What goes into ``tokenizer.ggml.*``."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = False
    add_eos: bool = False


def serving_template(template: str) -> str:
    """A training chat template without its ``{% generation %}`` markers (a transformers extension for
    the assistant mask that llama.cpp's and other runtimes' Jinja engines do not know)."""
    return _GENERATION_TAG.sub("", template)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i


def _fields(b: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 1:
            value, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            value, i = b[i:i + n], i + n
        elif wire == 5:
            value, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, value


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a SentencePiece ``tokenizer.model``, in id order."""
    try:
        pieces = []
        for number, value in _fields(Path(path).read_bytes()):
            if number == 1:  # ModelProto.pieces
                piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
                piece.update(dict(_fields(value)))
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], int(piece[3])))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise QloraError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise QloraError(f"{path}: not a SentencePiece model (no pieces)")
    return pieces


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QloraError("export: the tokenizer is not a fast (tokenizer.json) tokenizer; GGUF export needs one")
    return json.loads(backend.to_str())


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    pre = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("normalizer"))
    return bool(spec["model"].get("byte_fallback")) or "Metaspace" in pre or "\u2581" in pre


def _pre_name(spec: dict[str, Any]) -> str:
    text = json.dumps(spec.get("pre_tokenizer"))
    for pattern, name in PRE_TOKENIZERS.items():
        if json.dumps(pattern)[1:-1] in text:
            return name
    if '"ByteLevel"' in text and '"use_regex": true' in text and '"Split"' not in text:
        return "gpt2"
    log.warning("export: the tokenizer's pre-tokenizer is not one llama.cpp names; writing 'default' "
                "(llama.cpp may split text differently from transformers)")
    return "default"


def _added(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    return {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}


def build_vocab(tokenizer: Any, vocab_size: int, sentencepiece_model: Path | None = None) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` padded to the model's ``vocab_size`` rows."""
    spec = _backend(tokenizer)
    added = _added(tokenizer)
    if _is_sentencepiece(spec):
        if sentencepiece_model is None:
            raise QloraError("export: a SentencePiece tokenizer needs its tokenizer.model for GGUF (scores and "
                             "piece types); put it next to the tokenizer files or pass --tokenizer-model FILE")
        pieces = sentencepiece_pieces(sentencepiece_model)
        tokens, scores, types = map(list, zip(*pieces))
        vocab = Vocab(model="llama", tokens=tokens, types=types, scores=scores)
    else:
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
        types = [NORMAL if i in by_id else UNUSED for i in range(len(tokens))]
        merges = spec["model"].get("merges") or []
        if not merges:  # llama.cpp requires merges; the gguf writer cannot store an empty list
            raise QloraError("export: the tokenizer is a BPE vocabulary without merges (a plain byte "
                             "tokenizer), which llama.cpp cannot load; export a model with a trained tokenizer")
        vocab = Vocab(model="gpt2", tokens=tokens, types=types, pre=_pre_name(spec),
                      merges=[m if isinstance(m, str) else " ".join(m) for m in merges])
    for i, (content, special) in sorted(added.items()):
        while len(vocab.tokens) <= i:
            _pad(vocab)
        if vocab.model == "llama" and i < len(pieces):
            continue  # SentencePiece's own <unk>/<s>/</s> keep their piece types
        vocab.tokens[i], vocab.types[i] = content, CONTROL if special else USER_DEFINED
    if len(vocab.tokens) > vocab_size:
        raise QloraError(f"export: the tokenizer has {len(vocab.tokens)} tokens but the model's vocabulary only "
                         f"{vocab_size} rows; is it the model's tokenizer?")
    while len(vocab.tokens) < vocab_size:
        _pad(vocab)
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            vocab.special[key] = int(token_id)
    ids = tokenizer("a")["input_ids"]
    vocab.add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    vocab.add_eos = bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1
    return vocab


def _pad(vocab: Vocab) -> None:
    vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
    vocab.types.append(UNUSED)
    if vocab.scores is not None:
        vocab.scores.append(-1000.0)


def write_vocab(writer: Any, vocab: Vocab, chat_template: str | None, eot: str | None = None) -> None:
    """``tokenizer.ggml.*`` keys of ``vocab``, the chat template and the end-of-turn token ``eot``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    if eot is not None and eot in vocab.tokens:
        writer.add_eot_token_id(vocab.tokens.index(eot))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if chat_template:
        writer.add_chat_template(serving_template(chat_template))
