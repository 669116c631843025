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
    "olmo3": ("Olmo3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True}),
    "granite": ("GraniteConfig", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "cohere": ("CohereConfig", {}),
    "glm4": ("Glm4Config", {"head_dim": 16}),
    "smollm3": ("SmolLM3Config", {}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                      "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    "phimoe": ("PhimoeConfig", _MOE),
    "granitemoe": ("GraniteMoeConfig", _MOE),
}
MOE = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "phimoe", "granitemoe")


def family_config(family: str) -> Any:
    """The tiny transformers config of ``family`` (a key of :data:`FAMILIES`)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra})
