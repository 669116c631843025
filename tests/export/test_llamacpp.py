"""llama.cpp itself runs our exports (``slow``; needs ``QLORA_LLAMA_CPP``, see ``llamacpp.py``): the
merged model's GGUF gives our merged model's logits within the encoding's tolerance on a few prompts
and the same greedy tokens, llama.cpp tokenizes like transformers, and our GGUF LoRA adapter on the
base's GGUF gives the adapter model's logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qlora_trainer.export.gguf_adapter import write_adapter_gguf
from qlora_trainer.export.gguf_model import write_model_gguf
from qlora_trainer.lora import merge_lora
from qlora_trainer.lora.peft_format import read_adapter

from . import llamacpp
from .conftest import PROMPTS, add_lora, save_lora, tiny_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(), reason=f"llama.cpp runtime not found (${llamacpp.ENV})")]

# largest |Δlogit| allowed, relative to the largest |logit|: llama.cpp computes in f32 with an f16 KV
# cache; f16 weights add f16 rounding; q8_0 adds its 8-bit rounding of weights and (in its CPU matmul)
# of activations
TOLERANCE = {"f32": 1e-2, "f16": 1e-2, "bf16": 3e-2, "q8_0": 1e-1}


def _check(rt, model, tok, outtype: str, greedy: bool = True) -> list[float]:
    errors = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert rt.tokenize(text) == ids, text
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        got = rt.logits(ids)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        errors.append(err)
        assert err <= TOLERANCE[outtype], (outtype, text, err)
        if greedy:
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
            assert rt.greedy(ids, len(want)) == want, (outtype, text)
    return errors


@pytest.mark.parametrize("family,tok_name", [("llama", "llama3_tok"), ("mistral", "llama3_tok"),
                                             ("qwen2", "qwen2_tok")])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_merged_model_logits_in_llamacpp(family, tok_name, outtype, request, tmp_path):
    tok = request.getfixturevalue(tok_name)
    model = tiny_model(family, len(tok))
    add_lora(model)
    merge_lora(model, dtype=torch.float32)
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", outtype=outtype)
    rt = llamacpp.LlamaCpp(path)
    try:
        errors = _check(rt, model, tok, outtype, greedy=outtype in ("f32", "f16"))
    finally:
        rt.close()
    print(f"{family} {outtype}: max |Δlogit| / max |logit| = {max(errors):.2e}")


@pytest.mark.parametrize("family,tok_name", [("llama", "llama3_tok"), ("qwen2", "qwen2_tok")])
def test_adapter_on_base_in_llamacpp(family, tok_name, request, tmp_path):
    tok = request.getfixturevalue(tok_name)
    base = tiny_model(family, len(tok))
    base_path = write_model_gguf(base, tok, tmp_path / "base.gguf", outtype="f32")
    model = copy.deepcopy(base)
    weights = read_adapter(save_lora(model, add_lora(model, "rslora"), tmp_path / "adapter"))
    lora_path = write_adapter_gguf(weights, base.config, tmp_path / "lora.gguf")
    rt = llamacpp.LlamaCpp(base_path, lora=lora_path)
    try:
        errors = _check(rt, model.eval(), tok, "f32")
        with_adapter = [rt.logits(tok(text)["input_ids"]) for text in PROMPTS]
    finally:
        rt.close()
    merge_lora(model, dtype=torch.float32)  # llama.cpp's own numerics on both sides: adapter == merged
    merged = llamacpp.LlamaCpp(write_model_gguf(model, tok, tmp_path / "merged.gguf", outtype="f32"))
    try:
        gap = max(float(np.abs(merged.logits(tok(text)["input_ids"]) - got).max())
                  for text, got in zip(PROMPTS, with_adapter))
    finally:
        merged.close()
    assert gap <= 1e-3
    print(f"{family} adapter: max |Δlogit| / max |logit| = {max(errors):.2e}; adapter vs merged in llama.cpp "
          f"{gap:.1e}")


def test_sentencepiece_model_in_llamacpp(llama2_tok, tmp_path):
    """The Llama-2 SentencePiece vocabulary: llama.cpp tokenizes as transformers does and runs the model."""
    tok, spm = llama2_tok
    model = tiny_model("llama", 32000)
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", outtype="f16", sentencepiece_model=spm)
    rt = llamacpp.LlamaCpp(path)
    try:
        errors = _check(rt, model, tok, "f16")
    finally:
        rt.close()
    print(f"llama-2 tokenizer f16: max |Δlogit| / max |logit| = {max(errors):.2e}")
