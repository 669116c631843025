"""Generation memory (memory/inference.py): the KV-cache arithmetic and the largest batch that fits."""

from __future__ import annotations


def test_generation_batch_fits_the_budget():
    from qlora_trainer.memory.inference import generation_memory, kv_cache_bytes, largest_generation_batch
    from qlora_trainer.models.catalog import get_arch

    arch = get_arch("llama-2-7b")
    # Llama-2-7B KV cache in bf16: 2 * 32 layers * 32 heads * 128 dims * 2 bytes = 512 KiB per token
    assert kv_cache_bytes(arch, 1) == 512 * 1024
    kw = dict(prompt_len=200, new_tokens=256)
    m1 = generation_memory(arch, batch=1, **kw)
    assert 3.3e9 < m1.weights < 4.5e9                       # NF4 + DQ base, 16-bit embeddings/lm_head
    budget = 24 * 10**9
    b = largest_generation_batch(arch, budget, **kw)
    assert generation_memory(arch, batch=b, **kw).total <= budget < generation_memory(arch, batch=b + 1, **kw).total
    assert largest_generation_batch(arch, 10**9, **kw) == 0  # the weights alone do not fit 1 GB


def test_generation_weights_include_the_experts():
    """An MoE model's generation weights are its NF4 experts and 16-bit routers too, not only the attention."""
    from qlora_trainer.memory.estimate import estimate
    from qlora_trainer.memory.inference import generation_memory
    from qlora_trainer.models.catalog import get_arch, param_counts

    arch = get_arch("mixtral-8x7b")
    m = generation_memory(arch, batch=1, prompt_len=200, new_tokens=256)
    est = estimate(arch, seq_len=200)
    assert m.weights > param_counts(arch)["experts"] / 2                     # 4-bit experts: 0.5 B/param
    assert m.weights >= est.components["experts_nf4"] + est.components["router"] + est.components["base_nf4"]
