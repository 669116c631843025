"""Tiny random transformers configs of the decoder families users fine-tune (hidden 64, 2 layers,
vocab 256): the family matrix's models, built in-process (nothing downloads; build one with
``models.tiny.model_from_config``). MoE families: 4 experts, 2 active per token."""

from __future__ import annotations

from typing import Any

VOCAB = 256
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family -> (transformers config class name, extra config fields)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 48, "decoder_sparse_step": 1}),
    "mixtral": ("MixtralConfig", _MOE),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", {}),
}
MOE = ("qwen3_moe", "mixtral")


def family_config(family: str) -> Any:
    """The tiny transformers config of ``family`` (a key of :data:`FAMILIES`)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra})
