"""Small-LM pretraining pieces: byte encoding, windows, a short pretraining run, the cache."""

from __future__ import annotations

import pytest
import torch

from support import small_lm
from support.small_lm import SmallLMConfig, encode, eval_windows, sample_windows

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcode ✓\n" * 40)


def test_encode_matches_byte_tokenizer(tokenizer):
    ids = encode(TEXT[:300])
    assert ids.dtype == torch.long
    assert ids.tolist() == encode(TEXT[:300], tokenizer).tolist()


def test_windows_are_deterministic_and_shaped():
    ids = torch.arange(1000)
    a = sample_windows(ids, seq_len=16, batch_size=4, generator=torch.Generator().manual_seed(1))
    b = sample_windows(ids, seq_len=16, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous slices
    ev = eval_windows(ids, seq_len=16, max_windows=3)
    assert ev.shape == (3, 16) and ev[1, 0].item() == 16
    with pytest.raises(ValueError):
        sample_windows(ids[:10], seq_len=16, batch_size=1, generator=torch.Generator())


def test_pretrain_lowers_loss_and_cache_round_trips(tmp_path, monkeypatch):
    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("QLORA_DATA", str(tmp_path / "data"))
    cfg = SmallLMConfig(seq_len=32, batch_size=4, steps=12, lr=1e-2, warmup_steps=2)
    lm = small_lm.load_or_pretrain(cfg, cache=tmp_path / "cache")
    assert not lm.from_cache and len(lm.losses) == 12
    assert lm.losses[-1] < lm.losses[0] - 0.5                     # 5.6 nats (uniform) goes down fast
    again = small_lm.load_or_pretrain(cfg, cache=tmp_path / "cache")
    assert again.from_cache and again.losses == lm.losses
    for (k, a), b in zip(lm.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    copy = small_lm.fresh_copy(lm)
    assert copy is not lm.model and torch.equal(copy.lm_head.weight, lm.model.lm_head.weight)


def test_missing_corpus_is_a_one_line_error(tmp_path, monkeypatch):
    from qlora_trainer.errors import DataError

    monkeypatch.setenv("QLORA_DATA", str(tmp_path))
    with pytest.raises(DataError, match="tinyshakespeare/input.txt"):
        small_lm.shakespeare_text()


def test_lm_loss_matches_transformers_loss(tiny_model):
    tokens = torch.randint(0, 256, (2, 24))
    ours = small_lm.lm_loss(tiny_model, tokens)
    ref = tiny_model(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
