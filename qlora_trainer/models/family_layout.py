"""How each transformers decoder family lays out a layer beyond its shape numbers (norms, biases, MLP
kind, q/k norms, experts) and how its ``config.json`` spells them: what the architecture catalog
needs to count a family's parameters exactly and to translate its configs both ways, without
importing transformers.

Defaults (``bias_default``, ``tied_default``, ``head_dim_default``) are the transformers config
class's own, used when a ``config.json`` leaves the key out; ``tests/models/test_catalog_families.py``
checks them against the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyLayout:
    """One family's layer layout.

    config: the transformers config class. norms: hidden-wide norms per layer (Gemma 2/3 and GLM-4
    add post-norms: 4; Cohere's parallel block has one). norm_bias: LayerNorms with a bias (each
    norm holds 2 x hidden). qk_norm: ``head`` (one head_dim-wide norm each for q and k: Qwen3,
    Gemma 3) or ``all`` (over all q heads and all kv heads: OLMo2/3, OLMoE). mlp: ``gated``
    (gate/up/down), ``fused`` (gate_up/down: Phi-3, GLM-4) or ``plain`` (c_fc/c_proj, no gate:
    StarCoder2). fused_qkv: one ``qkv_proj`` (Phi-3). bias_key: the config key switching the
    optional biases ("" = none to switch; Qwen2's q/k/v biases are always there), covering
    ``bias_scope``: ``qkv``, ``qkvo`` or ``all`` (every linear of the layer). eps_key: the norm
    epsilon's key. MoE: experts_key (expert count), expert_width_key (each expert's width),
    shared_expert (Qwen2-MoE's dense shared MLP and its gate), sparse_step (the config can make some
    layers dense: ``decoder_sparse_step`` / ``mlp_only_layers``).
    """

    config: str
    norms: int = 2
    norm_bias: bool = False
    qk_norm: str = ""
    mlp: str = "gated"
    fused_qkv: bool = False
    bias_key: str = "attention_bias"
    bias_default: bool = False
    bias_scope: str = "qkvo"
    tied_default: bool = False
    head_dim_default: int = 0
    eps_key: str = "rms_norm_eps"
    experts_key: str = ""
    expert_width_key: str = "intermediate_size"
    shared_expert: bool = False
    sparse_step: bool = False


_L = FamilyLayout
_QWEN_MOE = dict(experts_key="num_experts", expert_width_key="moe_intermediate_size", sparse_step=True)
FAMILY_LAYOUTS: dict[str, FamilyLayout] = {
    "llama": _L("LlamaConfig"),
    "mistral": _L("MistralConfig", bias_key=""),
    "qwen2": _L("Qwen2Config", bias_key="", bias_default=True, bias_scope="qkv"),
    "qwen3": _L("Qwen3Config", qk_norm="head", head_dim_default=128),
    "gemma": _L("GemmaConfig", tied_default=True, head_dim_default=256),
    "gemma2": _L("Gemma2Config", norms=4, tied_default=True, head_dim_default=256),
    "gemma3": _L("Gemma3TextConfig", norms=4, qk_norm="head", tied_default=True, head_dim_default=256),
    "phi3": _L("Phi3Config", mlp="fused", fused_qkv=True, bias_key=""),
    "olmo2": _L("Olmo2Config", qk_norm="all"),
    "olmo3": _L("Olmo3Config", qk_norm="all"),
    "granite": _L("GraniteConfig"),
    "smollm3": _L("SmolLM3Config", tied_default=True),
    "glm4": _L("Glm4Config", norms=4, mlp="fused", bias_default=True, bias_scope="qkv", head_dim_default=128),
    "cohere": _L("CohereConfig", norms=1, tied_default=True, eps_key="layer_norm_eps"),
    "starcoder2": _L("Starcoder2Config", norm_bias=True, mlp="plain", bias_key="use_bias", bias_default=True,
                     bias_scope="all", tied_default=True, eps_key="norm_epsilon"),
    "mixtral": _L("MixtralConfig", bias_key="", experts_key="num_local_experts"),
    "qwen3_moe": _L("Qwen3MoeConfig", qk_norm="head", **_QWEN_MOE),
    "qwen2_moe": _L("Qwen2MoeConfig", bias_key="qkv_bias", bias_default=True, bias_scope="qkv", shared_expert=True,
                    **_QWEN_MOE),
    "olmoe": _L("OlmoeConfig", qk_norm="all", experts_key="num_experts"),
    "phimoe": _L("PhimoeConfig", norm_bias=True, experts_key="num_local_experts"),
    "granitemoe": _L("GraniteMoeConfig", experts_key="num_local_experts"),
}

# config.json model_type -> family
MODEL_TYPES: dict[str, str] = {**{f: f for f in FAMILY_LAYOUTS}, "gemma3_text": "gemma3"}
