"""Batched, left-padded, KV-cached generation equals one-at-a-time generation token for token
(greedy, random tiny Llama with a non-zero LoRA adapter), for fixed and memory-sized batches; seeded
sampling repeats and leaves the caller's RNG alone."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.config import Config, LoRAConfig
from qlora_trainer.evaluate import GenerationSettings, generate_batch, generate_texts
from qlora_trainer.lora import inject_lora, lora_layers
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.tiny import byte_tokenizer

PROMPTS = ["Hello there", "Hi", "The quick brown fox jumps over", "a", "Question: 2+2?\nAnswer:", "xyz xyz"]


def _model(quantization: str):
    cfg = Config()
    cfg.model.quantization = quantization
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=260)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_batched_generation_equals_one_at_a_time(quantization):
    model, tok = _model(quantization), byte_tokenizer()
    settings = GenerationSettings(max_new_tokens=10, batch_size=1)
    single = [generate_batch(model, tok, [p], settings)[0] for p in PROMPTS]
    batched = generate_batch(model, tok, PROMPTS, settings)                       # one left-padded batch
    assert [c.ids for c in batched] == [c.ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(len(c.ids) == 10 or c.ids[-1] == tok.eos_token_id for c in single)
    assert len({tuple(c.ids) for c in single}) > 1                                # not a degenerate model
    sized = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=4), progress=False)
    auto = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10), progress=False)
    assert [c.ids for c in sized] == [c.ids for c in auto] == [c.ids for c in single]
    assert [c.prompt_tokens for c in auto] == [len(tok(p)["input_ids"]) for p in PROMPTS]


def test_seeded_sampling_repeats_and_leaves_the_rng_alone():
    model, tok = _model("none"), byte_tokenizer()
    s = GenerationSettings(max_new_tokens=8, sample=True, temperature=1.0, top_p=1.0, seed=3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = generate_batch(model, tok, PROMPTS[:3], s)
    assert torch.equal(torch.random.get_rng_state(), before)                     # caller's RNG untouched
    b = generate_batch(model, tok, PROMPTS[:3], s)
    c = generate_batch(model, tok, PROMPTS[:3], GenerationSettings(max_new_tokens=8, sample=True, temperature=1.0,
                                                                   top_p=1.0, seed=4))
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.ids for x in a] != [x.ids for x in c]
