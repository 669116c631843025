"""adapt_model: kernel-backed RMSNorm / SwiGLU MLP / RoPE attention give the unadapted model's
logits and gradients (Triton under the CPU interpreter and the torch references), keep every
parameter object and name, and a full AdamW step with kernels + checkpointing on equals one off.

Tolerances (fp32 tiny models): logits atol 1e-5; gradients rtol 1e-4 / atol 1e-6 (observed
~1e-7: the kernels accumulate in a different order than torch).
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_trainer.kernels.rmsnorm import RMSNorm
from qlora_trainer.kernels.swiglu import SwiGLUMLP
from qlora_trainer.models.adapt import RoPEAttention, adapt_model
from qlora_trainer.models.catalog import ArchSpec
from qlora_trainer.models.checkpointing import apply_checkpointing
from qlora_trainer.models.tiny import random_model

# two layers, hidden 64 (head_dim 16): the training-step tests run the Triton interpreter
_SMALL = ArchSpec("tiny-2l", hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=260)


def _batch(b: int = 2, t: int = 11, vocab: int = 260):
    ids = torch.randint(0, vocab - 4, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the attention mask must reach the attention kernel
    return ids, mask


def _logits_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (logits.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1]) and want[1]
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adapted_tiny_model_matches(tiny_model, backend):
    model = tiny_model.train()
    ids, mask = _batch()
    want = _logits_and_grads(model, ids, mask)
    adapted = adapt_model(copy.deepcopy(model), backend)
    kinds = [type(m) for m in adapted.modules()]
    assert kinds.count(RMSNorm) == 9 and kinds.count(SwiGLUMLP) == 4 and kinds.count(RoPEAttention) == 4
    _assert_same(_logits_and_grads(adapted, ids, mask), want)


def test_adapted_nf4_model_matches(tiny_nf4_model):
    """NF4 base (frozen 4-bit projections): logits and the grads of the 16-bit params agree."""
    model = tiny_nf4_model.train()
    ids, mask = _batch()
    want = _logits_and_grads(model, ids, mask)
    adapted = adapt_model(copy.deepcopy(model), "triton")
    assert type(adapted.model.layers[0].mlp.gate_proj).__name__ == "NF4Linear"
    _assert_same(_logits_and_grads(adapted, ids, mask), want)


def test_adapt_keeps_parameters_and_names_and_is_idempotent(tiny_model):
    before = dict(tiny_model.named_parameters())
    keys = list(tiny_model.state_dict())
    model = adapt_model(tiny_model, "torch")
    after = dict(model.named_parameters())
    assert list(model.state_dict()) == keys
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    text = repr(model)
    assert repr(adapt_model(model, "torch")) == text


def test_bf16_adapted_model_is_as_accurate_as_plain():
    """bf16 model: both paths against the same weights in fp32. The kernels compute in fp32 and
    round once per output; the CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest),
    which biases its error up (measured: logits 0.0075 vs 0.0062, grads 0.024 vs 0.015)."""
    plain = random_model("tiny", dtype=torch.bfloat16, seed=0).train()
    ids, mask = _batch()
    exact = _logits_and_grads(copy.deepcopy(plain).float(), ids, mask)
    results = [_logits_and_grads(m, ids, mask) for m in (plain, adapt_model(copy.deepcopy(plain), "triton"))]

    def err(res) -> tuple[float, float]:
        rel = [_rel(res[0], exact[0])] + [_rel(res[1][n], g) for n, g in exact[1].items()]
        return rel[0], max(rel[1:])

    (plain_logits, plain_grads), (ours_logits, ours_grads) = err(results[0]), err(results[1])
    assert ours_logits < 2 * plain_logits + 1e-3 and ours_logits < 2e-2
    assert ours_grads < 2.5 * plain_grads + 1e-3 and ours_grads < 6e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families(family):
    arch = ArchSpec(f"tiny-{family}", hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2,
                    vocab=260, family=family)
    model = random_model(arch, seed=1).train()
    ids, mask = _batch(t=7)
    want = _logits_and_grads(model, ids, mask)
    adapted = adapt_model(copy.deepcopy(model), "triton")
    assert isinstance(adapted.model.layers[0].self_attn, RoPEAttention)
    _assert_same(_logits_and_grads(adapted, ids, mask), want)


def _two_adamw_steps(model, params, ids, mask, labels, **opt_kwargs) -> list[float]:
    """Losses of two AdamW steps (lr 1e-3) on ``params``; the global seed is set per step so models
    with dropout draw the same masks."""
    opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-6, **opt_kwargs)
    losses = []
    for step in range(2):
        torch.manual_seed(step)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bad_backend_is_a_one_line_error(tiny_model):
    with pytest.raises(ValueError, match="backend must be one of"):
        adapt_model(tiny_model, "cuda")


def test_training_step_kernels_on_equals_off():
    """Forward + backward + AdamW on all params: adapted (Triton) + checkpointed (offload on)
    vs the plain model. Params after two steps within 1e-5, losses within 1e-6 relative."""
    ids, mask = _batch(t=7)
    labels = ids.masked_fill(mask == 0, -100)
    plain = random_model(_SMALL, seed=3).train()
    fast = apply_checkpointing(adapt_model(copy.deepcopy(plain), "triton"), offload=True)
    results = []
    for model in (plain, fast):
        losses = _two_adamw_steps(model, model.parameters(), ids, mask, labels, weight_decay=0.01)
        results.append((losses, dict(model.named_parameters())))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a[1] < loss_a[0]  # the step did something
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-6, atol=0)
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, rtol=0, atol=1e-5, msg=name)


def test_qlora_training_step_kernels_on_equals_off():
    """The real configuration: NF4 base + LoRA (dropout on: checkpoint recompute must replay the
    same masks), kernels (Triton) + checkpointing with offload vs neither. Two AdamW steps on the
    LoRA parameters: losses within 1e-6 relative, adapter weights within 1e-5 (lr 1e-3)."""
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora.inject import inject_lora
    from qlora_trainer.models.quantize import quantize_model

    plain = quantize_model(random_model(_SMALL, seed=2), compute_dtype=torch.float32).train()
    inject_lora(plain, LoRAConfig(r=4, alpha=8, dropout=0.1), dtype=torch.float32, backend="torch")
    fast = apply_checkpointing(adapt_model(copy.deepcopy(plain), "triton"), offload=True)
    ids, mask = _batch(t=7)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (plain, fast):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        results.append((_two_adamw_steps(model, params.values(), ids, mask, labels), params))
    (loss_a, params_a), (loss_b, params_b) = results
    assert params_a and all(".lora_" in n for n in params_a) and params_a.keys() == params_b.keys()
    assert loss_a[1] != loss_a[0]
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-6, atol=0)
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, rtol=0, atol=1e-5, msg=name)


# -- the fused residual add + RMSNorm decoder layer ------------------------------------------------


def _qlora_small(seed: int = 4):
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora.inject import inject_lora
    from qlora_trainer.models.quantize import quantize_model

    model = quantize_model(random_model(_SMALL, seed=seed), compute_dtype=torch.float32).train()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1), dtype=torch.float32, backend="torch")
    with torch.no_grad():  # B = 0 at init would make every dA zero: give the adapters a value
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("checkpointed", [False, True])
def test_fused_decoder_layer_equals_unfused(checkpointed):
    """NF4 + LoRA (dropout on), Triton kernels, fp32: logits and every LoRA gradient of a full
    forward + backward with the fused decoder layers equal those without (checkpointing on and off:
    the recompute runs the fused kernel too), same parameter objects and state-dict keys."""
    from qlora_trainer.models.adapt import FusedDecoderLayer

    base = _qlora_small()
    ids, mask = _batch(t=7)
    results, keys = [], []
    for fuse in (False, True):
        model = adapt_model(copy.deepcopy(base), "triton", fuse_add_norm=fuse)
        if checkpointed:
            model = apply_checkpointing(model)
        layer = model.model.layers[1]
        inner = layer._layer if checkpointed else layer
        assert isinstance(inner, FusedDecoderLayer) == fuse and isinstance(inner.post_attention_layernorm, RMSNorm)
        torch.manual_seed(0)  # the same dropout masks
        results.append(_logits_and_grads(model, ids, mask))
        keys.append(list(model.state_dict()))
    assert keys[0] == keys[1]
    (want_logits, want), (got_logits, got) = results
    assert want and set(got) == set(want) and all(".lora_" in n for n in want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    for name, g in want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_layers_generate_the_same_with_and_without_cache(tiny_model):
    """Greedy decoding through the KV cache (whatever name this transformers passes it under) gives
    the tokens and logits of decoding without a cache, and of the unfused model."""
    ids = torch.randint(0, 250, (1, 6))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=259)
    runs = []
    for fuse, cache in ((True, True), (True, False), (False, True)):
        model = adapt_model(copy.deepcopy(tiny_model), "triton", fuse_add_norm=fuse).eval()
        with torch.no_grad():
            runs.append(model.generate(ids, use_cache=cache, **kw))
    for other in runs[1:]:
        assert torch.equal(other.sequences, runs[0].sequences)
        torch.testing.assert_close(torch.stack(other.logits), torch.stack(runs[0].logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_fused_layer_passes_the_cache_under_either_name(tiny_model, name):
    """transformers 5.24 calls the layer with ``cache=``, 5.17-5.23 with ``past_key_values=``."""
    from transformers import DynamicCache

    model = adapt_model(tiny_model, "torch")
    layer, h = model.model.layers[0], torch.randn(1, 5, 128)
    pos = torch.arange(5)[None]
    emb = model.model.rotary_emb(h, pos)
    cache = DynamicCache(config=model.config)
    out = layer(h, position_ids=pos, position_embeddings=emb, use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(out, layer(h, position_ids=pos, position_embeddings=emb), rtol=0, atol=0)


def test_fused_layer_after_checkpointing_and_when_off(tiny_model):
    """adapt_model after apply_checkpointing re-wraps the fused layer (same keys, idempotent);
    ``fuse_add_norm=False`` (and transformers' own checkpointing on a layer) keeps transformers' layers."""
    from qlora_trainer.models.adapt import FusedDecoderLayer
    from qlora_trainer.models.checkpointing import CheckpointedLayer

    keys = list(tiny_model.state_dict())
    assert type(adapt_model(copy.deepcopy(tiny_model), "torch", fuse_add_norm=False).model.layers[0]).__name__ \
        == "LlamaDecoderLayer"
    hf_ckpt = copy.deepcopy(tiny_model)
    hf_ckpt.model.layers[1].gradient_checkpointing = True  # transformers' own checkpointing: its class only
    assert [type(m).__name__ for m in adapt_model(hf_ckpt, "torch").model.layers][:2] == \
        ["FusedDecoderLayer", "LlamaDecoderLayer"]
    model = adapt_model(apply_checkpointing(tiny_model), "torch")
    layer = model.model.layers[3]
    assert isinstance(layer, CheckpointedLayer) and isinstance(layer._layer, FusedDecoderLayer)
    assert isinstance(layer._layer.mlp, SwiGLUMLP) and layer.hidden_size == 128
    assert list(model.state_dict()) == keys
    text = repr(model)
    assert repr(adapt_model(model, "torch")) == text
