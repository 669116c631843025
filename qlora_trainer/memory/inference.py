"""Memory of batched, KV-cached generation (``qlora-trainer eval``): what a batch adds on top of the
loaded weights, and the largest batch that fits a budget.

Per sequence of ``P`` prompt + ``N`` new tokens, at the end of decoding (the peak):

* KV cache: ``2 (K, V) * layers * kv_heads * head_dim * (P + N) * act_bytes``;
* the prefill transient of one layer (freed layer by layer): the residual stream and attention
  output ``2 * P * hidden``, the MLP's gate / up / product ``3 * P * intermediate``, all ``act_bytes``
  (an MoE layer: the routed experts' and any shared expert's width, :func:`moe_layer_arch`);
* the last position's logits and their fp32 copy for sampling: ``vocab * (act_bytes + 4)``.

The weights themselves come from the training estimator (:func:`~qlora_trainer.memory.estimate.estimate`:
NF4 codes, quantization constants, MoE experts and routers, embeddings, lm_head, norms, adapters); a caller that already
holds the model in memory passes ``include_weights=False`` and a budget of what is still free.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_trainer.models.catalog import ArchSpec
from qlora_trainer.memory.estimate import estimate, moe_layer_arch

WEIGHT_COMPONENTS = ("base_nf4", "base_16bit", "quant_constants", "experts_nf4", "experts_16bit",
                     "experts_quant_constants", "router", "embeddings", "lm_head", "norms_biases", "lora_params")


@dataclass(frozen=True)
class GenerationMemory:
    """Bytes of one generation batch."""

    weights: int
    kv_cache: int
    transient: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.transient


def kv_cache_bytes(arch: ArchSpec, tokens: int, *, act_bytes: int = 2) -> int:
    """K and V of every layer for ``tokens`` cached positions (all sequences together)."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * tokens * act_bytes


def generation_memory(arch: ArchSpec, *, batch: int, prompt_len: int, new_tokens: int, act_bytes: int = 2,
                      quant: str = "nf4", lora_r: int = 16, targets: str | list[str] = "all-linear",
                      include_weights: bool = True) -> GenerationMemory:
    """Peak bytes of generating ``new_tokens`` after ``batch`` left-padded prompts of ``prompt_len``."""
    weights = 0
    if include_weights:
        est = estimate(arch, seq_len=prompt_len, batch=1, lora_r=lora_r, targets=targets, quant=quant,
                       act_bytes=act_bytes)
        weights = sum(est.components.get(k, 0) for k in WEIGHT_COMPONENTS)
    kv = kv_cache_bytes(arch, batch * (prompt_len + new_tokens), act_bytes=act_bytes)
    prefill = batch * prompt_len * (2 * arch.hidden + 3 * moe_layer_arch(arch).intermediate) * act_bytes
    logits = batch * arch.vocab * (act_bytes + 4)
    return GenerationMemory(weights, kv, prefill + logits)


def largest_generation_batch(arch: ArchSpec, budget_bytes: int, *, prompt_len: int, new_tokens: int,
                             act_bytes: int = 2, cap: int = 256, **kwargs) -> int:
    """Largest batch (1..``cap``) whose :func:`generation_memory` total fits ``budget_bytes``; 0 when
    not even one sequence does. Memory grows with the batch, so bisect."""
    def fits(b: int) -> bool:
        return generation_memory(arch, batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                                 act_bytes=act_bytes, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
