"""Padding, length grouping, packing: a packed forward pass equals the samples' separate passes."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.config import DataConfig
from qlora_trainer.data import IGNORE_INDEX, block_causal_mask, make_dataloader
from qlora_trainer.data.collate import LengthGroupedBatchSampler, pack_indices

ROWS = [{"input_ids": list(range(10, 10 + n)), "labels": [IGNORE_INDEX] * (n // 2) + list(range(n - n // 2))}
        for n in (5, 9, 3, 12, 7, 4, 6)]


def _batches(cfg, **kw):
    from qlora_trainer.models.tiny import byte_tokenizer

    return list(make_dataloader(ROWS, cfg=cfg, tokenizer=byte_tokenizer(), **kw))


def test_padding_batches():
    (b,) = _batches(DataConfig(seq_len=16), batch_size=7, shuffle=False, seed=0)
    assert b["input_ids"].shape == (7, 12)
    assert b["attention_mask"].sum(1).tolist() == [5, 9, 3, 12, 7, 4, 6]
    assert b["input_ids"][2, 3:].eq(259).all() and b["labels"][2, 3:].eq(IGNORE_INDEX).all()
    assert b["labels"][0, :5].tolist() == ROWS[0]["labels"]


def test_shuffle_is_deterministic_per_seed_and_epoch():
    cfg = DataConfig(seq_len=16)

    def lengths(**k):
        return [b["attention_mask"].sum(1).tolist() for b in _batches(cfg, batch_size=2, shuffle=True, **k)]

    a, b, c = lengths(seed=1), lengths(seed=1), lengths(seed=1, epoch=1)
    assert a == b and a != c
    assert sorted(sum(a, [])) == sorted(len(r["input_ids"]) for r in ROWS)


def test_length_grouped_sampler_sorts_within_megabatch():
    lengths = [5, 9, 3, 12, 7, 4, 6, 8]
    s = LengthGroupedBatchSampler(lengths, 2, seed=0, mega=4)
    batches = list(s)
    assert sorted(sum(batches, [])) == list(range(8)) and len(s) == 4
    assert all(lengths[b[0]] >= lengths[b[1]] for b in batches)
    assert batches == list(LengthGroupedBatchSampler(lengths, 2, seed=0, mega=4))


def test_pack_indices_never_exceeds_seq_len():
    lengths = [len(r["input_ids"]) for r in ROWS]
    blocks = pack_indices(lengths, 16, range(len(lengths)))
    assert sorted(sum(blocks, [])) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16 for b in blocks)
    assert blocks == [[0, 1], [2, 3], [4, 5], [6]]


def test_packed_batch_layout():
    b = _batches(DataConfig(seq_len=16, pack=True), batch_size=4, shuffle=False, seed=0)[0]
    assert "attention_mask" not in b
    assert b["position_ids"][0].tolist() == list(range(5)) + list(range(9)) + [0]  # padded to the longest block (15)
    lab = b["labels"][0].tolist()
    assert lab[0] == IGNORE_INDEX and lab[5] == IGNORE_INDEX  # no prediction across the sample boundary
    assert lab[5 + 4:14] == ROWS[1]["labels"][4:] and lab[14:] == [IGNORE_INDEX]
    m = block_causal_mask(b["position_ids"][:1])[0, 0]
    assert m[6, 5] and not m[6, 4] and not m[5, 6] and m[4, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(attn, tiny_model):
    from qlora_trainer.models.tiny import random_model

    model = tiny_model if attn == "sdpa" else random_model("tiny", seed=0, attn_implementation="eager").eval()
    b = _batches(DataConfig(seq_len=16, pack=True), batch_size=4, shuffle=False, seed=0)
    pos = b[0]["position_ids"]
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers skips packed-sequence detection
        packed = model(input_ids=b[0]["input_ids"], position_ids=pos, use_cache=False).logits
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        for k, (row, s) in enumerate(zip(ROWS[:2], starts)):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[0, s:s + len(row["input_ids"])], alone, atol=1e-4, rtol=1e-4)
        # and the packing matters: without restarts the second sample attends to the first
        mixed = model(input_ids=b[0]["input_ids"], use_cache=False).logits
        assert not torch.allclose(mixed[0, 5:14], packed[0, 5:14], atol=1e-3)
