"""GGUF of a merged model, read back with the gguf package's reader: every tensor against the model
(bit-exact for f32/f16/bf16, within q8_0's rounding for q8_0), llama.cpp's required keys, both
vocabulary kinds; and, not trusting our reader, transformers' own GGUF loader gives our logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.export.gguf_model import write_model_gguf

from .conftest import PROMPTS, tiny_model

# the names llama.cpp's llama/qwen2 graphs load (llama.cpp's src/llama-arch.cpp), written out here
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def expected_tensors(model, permute: bool) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor, mapped and (Llama) q/k-permuted by this test's own rule."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            key = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            key = f"blk.{i}.{LAYER_NAMES[module]}.{kind}"
            heads = {"self_attn.q_proj": cfg.num_attention_heads,
                     "self_attn.k_proj": cfg.num_key_value_heads}.get(module)
            if permute and heads:  # rotate-half pairs (i, i + d/2) -> adjacent pairs (2i, 2i + 1)
                d = t.shape[0] // heads
                idx = torch.arange(t.shape[0]).reshape(heads, 2, d // 2).transpose(1, 2).reshape(-1)
                t = t[idx]
        out[key] = t.float()
    return out


def decoded(tensor) -> np.ndarray:
    """A reader tensor as fp32 in PyTorch's (rows, cols) order, dequantized by the gguf package."""
    import gguf

    kind = tensor.tensor_type
    data = np.asarray(tensor.data)
    if kind == gguf.GGMLQuantizationType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(data.shape[0], -1)
    return gguf.quants.dequantize(data, kind).astype(np.float32)


def fields(reader) -> dict:
    import gguf

    out = {}
    for key, f in reader.fields.items():
        out[key] = f.contents() if f.types and f.types[0] != gguf.GGUFValueType.ARRAY else f.contents()
    return out


@pytest.mark.parametrize("family,tok_name,tied", [("llama", "llama3_tok", False), ("mistral", "llama3_tok", False),
                                                   ("qwen2", "qwen2_tok", True)])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_every_tensor_and_key(family, tok_name, tied, outtype, request, tmp_path):
    import gguf

    tok = request.getfixturevalue(tok_name)
    model = tiny_model(family, len(tok), tied=tied)
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", outtype=outtype, chat_template="{{ x }}",
                            eot="<|eot_id|>")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # nothing left aside
    reader = gguf.GGUFReader(path)
    want = expected_tensors(model, permute=family != "qwen2")
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, ref in want.items():
        t = got[name]
        arr = decoded(t).reshape(ref.shape)
        if ref.ndim == 1 or outtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(arr, ref.numpy(), err_msg=name)
        elif outtype == "f16":
            np.testing.assert_array_equal(arr, ref.half().float().numpy(), err_msg=name)
        elif outtype == "bf16":
            np.testing.assert_array_equal(arr, ref.bfloat16().float().numpy(), err_msg=name)
        else:  # q8_0: per 32-value block q = round(x / d), d = max|x| / 127 stored in f16 (relative error
            # 2^-11), so |x - q d16| <= d/2 + 127 d 2^-11
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            blocks = ref.reshape(-1, 32)
            bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2**-11) * 1.001 + 1e-8
            assert ((torch.from_numpy(arr).reshape(-1, 32) - blocks).abs() <= bound).all(), name
    kv = fields(reader)
    arch = "qwen2" if family == "qwen2" else "llama"
    c = model.config
    assert kv["general.architecture"] == arch and kv["general.type"] == "model"
    assert kv[f"{arch}.block_count"] == c.num_hidden_layers
    assert kv[f"{arch}.context_length"] == c.max_position_embeddings
    assert kv[f"{arch}.embedding_length"] == c.hidden_size
    assert kv[f"{arch}.feed_forward_length"] == c.intermediate_size
    assert kv[f"{arch}.attention.head_count"] == c.num_attention_heads
    assert kv[f"{arch}.attention.head_count_kv"] == c.num_key_value_heads
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert kv[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"]
                                                         if getattr(c, "rope_parameters", None) else c.rope_theta)
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == ("qwen2" if family == "qwen2" else "llama-bpe")
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == c.vocab_size and tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert kv["tokenizer.ggml.merges"][:3] == [" ".join(m) if not isinstance(m, str) else m for m in
                                               json.loads(tok.backend_tokenizer.to_str())["model"]["merges"][:3]]
    assert kv["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_start|>")] == 3  # control
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert kv["tokenizer.chat_template"] == "{{ x }}"


def test_sentencepiece_vocabulary(llama2_tok, tmp_path):
    """The Llama-2 tokenizer: pieces, scores and types straight from tokenizer.model."""
    import gguf

    tok, spm = llama2_tok
    model = tiny_model("llama", 32000)
    with pytest.raises(QloraError, match="tokenizer.model"):
        write_model_gguf(model, tok, tmp_path / "no-spm.gguf", outtype="f16")
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", outtype="f16",
                            sentencepiece_model=spm)
    kv = fields(gguf.GGUFReader(path))
    assert kv["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in kv
    tokens, scores, types = (kv[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:4] == [2, 3, 3, 6]  # unknown, control, control, byte
    assert tokens[260] == "▁t" and scores[260] == -1.0 and types[260] == 1
    assert tokens == tok.convert_ids_to_tokens(list(range(32000)))
    assert kv["tokenizer.ggml.bos_token_id"] == 1
    assert kv["tokenizer.ggml.add_bos_token"] is (tok("a")["input_ids"][0] == 1)  # as transformers tokenizes


def test_refusals(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora_trainer.models.tiny import byte_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260))
    with pytest.raises(QloraError, match="architecture gpt2 is not one"):
        write_model_gguf(model, byte_tokenizer(), tmp_path / "gpt2.gguf")
    with pytest.raises(QloraError, match="without merges"):
        write_model_gguf(tiny_model("llama", 260), byte_tokenizer(), tmp_path / "bytes.gguf")
    with pytest.raises(QloraError, match="q4_k"):
        write_model_gguf(tiny_model("llama", 260), byte_tokenizer(), tmp_path / "k.gguf", outtype="q4_k")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family,tok_name", [("llama", "llama3_tok"), ("qwen2", "qwen2_tok")])
def test_transformers_gguf_loader_gives_our_logits(family, tok_name, request, tmp_path):
    """An independent reader: transformers' GGUF loader (its own name map, its own un-permutation and
    dequantization) rebuilds the model; logits equal ours (f32 exactly up to fp32 noise; f16 within
    f16 rounding) and greedy tokens are the same."""
    from transformers import AutoModelForCausalLM

    tok = request.getfixturevalue(tok_name)
    model = tiny_model(family, len(tok))
    for outtype, tol in (("f32", 1e-5), ("f16", 2e-2)):
        write_model_gguf(model, tok, tmp_path / f"{outtype}.gguf", outtype=outtype)
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{outtype}.gguf",
                                                    dtype=torch.float32).eval()
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                ref, got = model(ids).logits, back(ids).logits
            assert (ref - got).abs().max().item() <= tol, (outtype, text)
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
            assert torch.equal(model.generate(ids, **kw), back.generate(ids, **kw))


def test_qwen3_norms_and_head_dim(llama3_tok, tmp_path):
    """Qwen3: per-head q/k norms map to attn_q_norm / attn_k_norm, a head_dim other than hidden/heads is
    written as key/value_length; transformers' loader (whose Qwen3 head_dim is its default 128) rebuilds
    the model exactly."""
    import gguf
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, vocab_size=len(llama3_tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape))
    path = write_model_gguf(model, llama3_tok, tmp_path / "q3.gguf", outtype="f32")
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    kv = fields(reader)
    assert kv["general.architecture"] == "qwen3" and kv["qwen3.attention.key_length"] == 128
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q3.gguf", dtype=torch.float32).eval()
    ids = llama3_tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
