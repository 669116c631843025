"""Architecture catalog: the shapes of the models users fine-tune, read by the estimator, the
synthetic-model builder and ``random:<name>`` model paths.

Shapes are copied from each model's ``config.json``; :func:`arch_from_hf_config` reads any other
config on disk of a family :data:`~qlora_trainer.models.family_layout.FAMILY_LAYOUTS` knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qlora_trainer.errors import ConfigError
from qlora_trainer.io import read_json_object
from qlora_trainer.models.family_layout import FAMILY_LAYOUTS, MODEL_TYPES, FamilyLayout


@dataclass(frozen=True)
class ArchSpec:
    """Decoder-only transformer shape.

    hidden: d_model. intermediate: MLP inner width (MoE: each expert's, see below). layers: decoder
    blocks. heads / kv_heads: attention heads (kv_heads < heads is GQA). vocab: embedding rows.
    tied: lm_head shares the embedding. family: a key of :data:`FAMILY_LAYOUTS` (how the family lays
    out its norms, biases and MLP). ``head_dim_``: the attention head width when it is not
    hidden / heads (Qwen3, Gemma). MoE (``experts`` > 0): every layer's MLP is ``experts`` experts
    of width ``intermediate`` (fused 3-D weights), ``experts_per_token`` routed per token, and a
    16-bit (experts, hidden) router; Qwen2-MoE adds a dense shared expert MLP of width
    ``shared_intermediate`` and its (hidden -> 1) gate. ``bias``: the family's optional attention
    biases (StarCoder2: every linear's), None = the family's transformers default; ``mlp_bias``
    (Llama / Granite / SmolLM3's gate/up/down biases), ``lm_head_bias`` (PhiMoE), ``qk_norm``
    (Cohere's per-head q/k LayerNorms).
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    family: str = "llama"
    max_position: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    head_dim_: int = 0
    experts: int = 0
    experts_per_token: int = 0
    shared_intermediate: int = 0
    bias: bool | None = None
    mlp_bias: bool = False
    lm_head_bias: bool = False
    qk_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def layout(self) -> FamilyLayout:
        return FAMILY_LAYOUTS[self.family]

    @property
    def has_bias(self) -> bool:
        """The family's optional biases are on (``bias``, else the family's default)."""
        return self.layout.bias_default if self.bias is None else self.bias

    def to_hf_config(self):
        """A transformers config of this shape (``LlamaConfig``, ``Qwen3MoeConfig``, ...)."""
        import transformers

        lay = self.layout
        kw: dict = {"head_dim": self.head_dim} if self.head_dim_ or lay.head_dim_default else {}
        if lay.bias_key:
            kw[lay.bias_key] = self.has_bias
        elif self.has_bias != lay.bias_default:
            raise ValueError(f"{self.name}: the {self.family} family has no switch for its biases")
        kw |= {k: True for k, on in [("mlp_bias", self.mlp_bias), ("lm_head_bias", self.lm_head_bias),
                                     ("use_qk_norm", self.qk_norm)] if on}
        if self.is_moe:
            kw |= {lay.experts_key: self.experts, "num_experts_per_tok": self.experts_per_token}
            if lay.expert_width_key != "intermediate_size":
                kw[lay.expert_width_key] = self.intermediate
            if lay.shared_expert:
                kw["shared_expert_intermediate_size"] = self.shared_intermediate
            if lay.sparse_step:
                kw |= {"decoder_sparse_step": 1, "mlp_only_layers": []}
        return getattr(transformers, lay.config)(
            hidden_size=self.hidden, intermediate_size=self.shared_intermediate or self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab, tie_word_embeddings=self.tied, max_position_embeddings=self.max_position,
            rope_theta=self.rope_theta, **{lay.eps_key: self.rms_eps}, **kw)


def linear_shapes(arch: ArchSpec) -> list[tuple[str, int, int, bool]]:
    """One decoder layer's linear layers as ``(name, in_features, out_features, has_bias)``.

    q (hidden -> heads*head_dim), k/v (hidden -> kv_heads*head_dim), o (heads*head_dim -> hidden),
    then the MLP: gate/up (hidden -> intermediate) and down (intermediate -> hidden); Phi-3 and GLM-4
    fuse gate/up (``gate_up_proj``, hidden -> 2*intermediate), StarCoder2's is ungated (``c_fc``,
    ``c_proj``); Phi-3 also fuses q/k/v (``qkv_proj``). Biases where the family has them
    (:class:`~qlora_trainer.models.family_layout.FamilyLayout`). An MoE arch's experts are not
    linear layers (:func:`expert_shapes`): only the attention projections are listed, and
    Qwen2-MoE's dense shared expert (``shared_expert.gate_proj`` ...) with its (hidden -> 1)
    ``shared_expert_gate``.
    """
    lay, h = arch.layout, arch.hidden
    q, kv, bias = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.has_bias
    o_bias = bias and lay.bias_scope != "qkv"
    if lay.fused_qkv:
        attn = [("qkv_proj", h, q + 2 * kv, bias), ("o_proj", q, h, o_bias)]
    else:
        attn = [("q_proj", h, q, bias), ("k_proj", h, kv, bias), ("v_proj", h, kv, bias), ("o_proj", q, h, o_bias)]
    if arch.is_moe:
        if not arch.shared_intermediate:
            return attn
        return attn + _mlp_shapes("gated", h, arch.shared_intermediate, False, "shared_expert.") + \
            [("shared_expert_gate", h, 1, False)]
    return attn + _mlp_shapes(lay.mlp, h, arch.intermediate, arch.mlp_bias or (bias and lay.bias_scope == "all"))


def _mlp_shapes(kind: str, h: int, i: int, bias: bool, prefix: str = "") -> list[tuple[str, int, int, bool]]:
    if kind == "plain":
        return [(prefix + "c_fc", h, i, bias), (prefix + "c_proj", i, h, bias)]
    up = [("gate_up_proj", h, 2 * i, bias)] if kind == "fused" else [("gate_proj", h, i, bias), ("up_proj", h, i, bias)]
    return [(prefix + n, a, b, c) for n, a, b, c in up] + [(prefix + "down_proj", i, h, bias)]


def expert_shapes(arch: ArchSpec) -> list[tuple[str, int, int]]:
    """One MoE layer's fused expert weights as ``(name, in, out)`` per expert (E = ``arch.experts``
    of each): ``gate_up_proj`` (hidden -> 2 * intermediate), ``down_proj`` (intermediate -> hidden).
    Empty for a dense arch."""
    if not arch.is_moe:
        return []
    return [("gate_up_proj", arch.hidden, 2 * arch.intermediate), ("down_proj", arch.intermediate, arch.hidden)]


def param_counts(arch: ArchSpec) -> dict[str, int]:
    """Parameter counts by kind: ``linear`` (quantized in QLoRA; Qwen2-MoE's shared expert and its
    gate included), ``experts`` (MoE expert weights, quantized by our NF4 path), ``router`` (MoE,
    16-bit), ``embed``, ``lm_head`` (0 when tied), ``norms`` + ``biases`` (kept 16-bit), and
    ``total``. Norms: the family's per-layer norms (``FamilyLayout.norms``) and the final one,
    LayerNorm biases counted with them, plus q/k norms (Qwen3, Gemma 3: head_dim each; OLMo2/3,
    OLMoE and Cohere's optional ones: over all q / k heads). Biases: the linear layers' and PhiMoE's
    lm_head bias."""
    lay, shapes = arch.layout, linear_shapes(arch)
    lin = sum(i * o for _, i, o, _ in shapes) * arch.layers
    bias = sum(o for _, _, o, b in shapes if b) * arch.layers + (arch.vocab if arch.lm_head_bias else 0)
    experts = arch.experts * sum(i * o for _, i, o in expert_shapes(arch)) * arch.layers
    router = arch.experts * arch.hidden * arch.layers
    embed = arch.vocab * arch.hidden
    head = 0 if arch.tied else embed
    per_layer = lay.norms * arch.hidden
    qk_norm = lay.qk_norm or ("all" if arch.qk_norm else "")
    if qk_norm == "head":
        per_layer += 2 * arch.head_dim
    elif qk_norm == "all":
        per_layer += (arch.heads + arch.kv_heads) * arch.head_dim
    norms = (arch.layers * per_layer + arch.hidden) * (2 if lay.norm_bias else 1)
    return {"linear": lin, "experts": experts, "router": router, "embed": embed, "lm_head": head, "norms": norms,
            "biases": bias, "total": lin + experts + router + embed + head + norms + bias}


def _a(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **kw) -> ArchSpec:
    return ArchSpec(name, hidden, inter, layers, heads, kv, vocab, **kw)


_L3 = dict(vocab=128256, rope_theta=500000.0)
_QWEN = dict(vocab=152064, family="qwen2", rope_theta=1000000.0, rms_eps=1e-6, max_position=32768)
_QWEN3 = dict(vocab=151936, family="qwen3", rope_theta=1000000.0, rms_eps=1e-6, max_position=40960, head_dim_=128)
_GEMMA2 = dict(family="gemma2", tied=True, rms_eps=1e-6, max_position=8192)
_GEMMA3 = dict(family="gemma3", tied=True, rms_eps=1e-6, max_position=131072, rope_theta=1000000.0)

# Shapes from each model's config.json (hidden, intermediate, layers, heads, kv heads, vocab, tied).
CATALOG: dict[str, ArchSpec] = {a.name: a for a in [
    # the demo's model: byte-level vocabulary (256 bytes + 4 specials), a few layers, CPU-fast
    ArchSpec("tiny", hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=260,
             max_position=1024),
    # tiny with every in_features a multiple of 64: bitsandbytes' own CPU NF4 dequantize is right on
    # it on any CPU (docs/bitsandbytes-cpu.md), so the HF stack / PEFT can be compared with us exactly
    ArchSpec("tiny-64", hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, vocab=260,
             max_position=1024),
    # the CPU step benchmark's shape (benchmarks/cpu_step.py): big enough that the NF4 dequantization
    # shows, every in_features a multiple of 64 (bitsandbytes' CPU dequantize is right on it)
    ArchSpec("cpu-1024", hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8, vocab=260,
             max_position=1024),
    # LLaMA-1 (Touvron et al. 2023a), 2k context, full multi-head attention
    _a("llama-7b", 4096, 11008, 32, 32, 32, 32000, max_position=2048, rms_eps=1e-6),
    _a("llama-13b", 5120, 13824, 40, 40, 40, 32000, max_position=2048, rms_eps=1e-6),
    _a("llama-33b", 6656, 17920, 60, 52, 52, 32000, max_position=2048, rms_eps=1e-6),
    _a("llama-65b", 8192, 22016, 80, 64, 64, 32000, max_position=2048, rms_eps=1e-5),
    # Llama 2: 4k context; 70B uses GQA with 8 kv heads
    _a("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    _a("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    _a("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    # Llama 3 / 3.1 / 3.2 / 3.3: 128k vocabulary, GQA 8 kv heads
    _a("llama-3-8b", 4096, 14336, 32, 32, 8, max_position=8192, **_L3),
    _a("llama-3-70b", 8192, 28672, 80, 64, 8, max_position=8192, **_L3),
    _a("llama-3.1-8b", 4096, 14336, 32, 32, 8, max_position=131072, **_L3),
    _a("llama-3.1-70b", 8192, 28672, 80, 64, 8, max_position=131072, **_L3),
    _a("llama-3.2-1b", 2048, 8192, 16, 32, 8, tied=True, max_position=131072, **_L3),
    _a("llama-3.2-3b", 3072, 8192, 28, 24, 8, tied=True, max_position=131072, **_L3),
    _a("llama-3.3-70b", 8192, 28672, 80, 64, 8, max_position=131072, **_L3),
    # Mistral 7B v0.1 (32k vocab) and v0.3 (32768 vocab, rope 1e6)
    _a("mistral-7b", 4096, 14336, 32, 32, 8, 32000, family="mistral", max_position=32768),
    _a("mistral-7b-v0.3", 4096, 14336, 32, 32, 8, 32768, family="mistral", max_position=32768,
       rope_theta=1000000.0),
    # Qwen2.5 base models (q/k/v biases, 152k vocab)
    _a("qwen2.5-7b", 3584, 18944, 28, 28, 4, **_QWEN),
    _a("qwen2.5-14b", 5120, 13824, 48, 40, 8, **_QWEN),
    _a("qwen2.5-32b", 5120, 27648, 64, 40, 8, **_QWEN),
    _a("qwen2.5-72b", 8192, 29568, 80, 64, 8, **_QWEN),
    # Qwen3 dense (q/k norms, head_dim 128; the small ones tie their embeddings)
    _a("qwen3-0.6b", 1024, 3072, 28, 16, 8, tied=True, **_QWEN3),
    _a("qwen3-1.7b", 2048, 6144, 28, 16, 8, tied=True, **_QWEN3),
    _a("qwen3-4b", 2560, 9728, 36, 32, 8, tied=True, **_QWEN3),
    _a("qwen3-8b", 4096, 12288, 36, 32, 8, **_QWEN3),
    _a("qwen3-14b", 5120, 17408, 40, 40, 8, **_QWEN3),
    _a("qwen3-32b", 5120, 25600, 64, 64, 8, **_QWEN3),
    # Gemma 2 (tied 256k vocabulary, logit soft-capping) and Gemma 3 text (262k vocabulary)
    _a("gemma-2-2b", 2304, 9216, 26, 8, 4, 256000, head_dim_=256, **_GEMMA2),
    _a("gemma-2-9b", 3584, 14336, 42, 16, 8, 256000, head_dim_=256, **_GEMMA2),
    _a("gemma-2-27b", 4608, 36864, 46, 32, 16, 256000, head_dim_=128, **_GEMMA2),
    _a("gemma-3-1b", 1152, 6912, 26, 4, 1, 262144, head_dim_=256, **{**_GEMMA3, "max_position": 32768}),
    _a("gemma-3-4b", 2560, 10240, 34, 8, 4, 262208, head_dim_=256, **_GEMMA3),
    _a("gemma-3-12b", 3840, 15360, 48, 16, 8, 262208, head_dim_=256, **_GEMMA3),
    _a("gemma-3-27b", 5376, 21504, 62, 32, 16, 262208, head_dim_=128, **_GEMMA3),
    # Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj)
    _a("phi-3-mini", 3072, 8192, 32, 32, 32, 32064, family="phi3"),
    _a("phi-3-medium", 5120, 17920, 40, 40, 10, 32064, family="phi3"),
    _a("phi-4", 5120, 17920, 40, 40, 10, 100352, family="phi3", max_position=16384, rope_theta=250000.0),
    # OLMo 2 (q/k norms over all heads)
    _a("olmo-2-7b", 4096, 11008, 32, 32, 32, 100352, family="olmo2", rms_eps=1e-6, rope_theta=500000.0),
    _a("olmo-2-13b", 5120, 13824, 40, 40, 40, 100352, family="olmo2", rms_eps=1e-6, rope_theta=500000.0),
    # OLMo 3 (q/k norms over all heads, sliding-window layers)
    _a("olmo-3-7b", 4096, 11008, 32, 32, 32, 100278, family="olmo3", rms_eps=1e-6, rope_theta=500000.0,
       max_position=65536),
    # Gemma 1 ((1+w) norms, head_dim 256, tied 256k vocabulary)
    _a("gemma-7b", 3072, 24576, 28, 16, 16, 256000, family="gemma", head_dim_=256, tied=True, rms_eps=1e-6,
       max_position=8192),
    # Granite 3.3 (Llama-shaped, tied 49k vocabulary; scaling multipliers hold no parameters)
    _a("granite-3.3-8b", 4096, 12800, 40, 32, 8, 49159, family="granite", tied=True, max_position=131072,
       rope_theta=10000000.0),
    # SmolLM3 (Llama-shaped, tied; its no-RoPE layers hold no parameters)
    _a("smollm3-3b", 2048, 11008, 36, 16, 4, 128256, family="smollm3", tied=True, rms_eps=1e-6, max_position=65536,
       rope_theta=5000000.0),
    # GLM-4-0414 (q/k/v biases, fused gate_up, post-attention and post-MLP norms)
    _a("glm-4-9b", 4096, 13696, 40, 32, 2, 151552, family="glm4", head_dim_=128, max_position=32768),
    # Command R (Cohere: one bias-free LayerNorm per parallel block, tied 256k vocabulary)
    _a("command-r-35b", 8192, 22528, 40, 64, 64, 256000, family="cohere", tied=True, max_position=131072,
       rope_theta=8000000.0),
    # StarCoder2 (LayerNorms and linears with biases, ungated c_fc / c_proj MLP)
    _a("starcoder2-15b", 6144, 24576, 40, 48, 4, 49152, family="starcoder2", tied=False, max_position=16384,
       rope_theta=100000.0),
    # mixtures of experts: intermediate is each expert's width
    _a("mixtral-8x7b", 4096, 14336, 32, 32, 8, 32000, family="mixtral", experts=8, experts_per_token=2,
       max_position=32768, rope_theta=1000000.0),
    _a("qwen3-30b-a3b", 2048, 768, 48, 32, 4, experts=128, experts_per_token=8, **{**_QWEN3, "family": "qwen3_moe"}),
    _a("qwen3-235b-a22b", 4096, 1536, 94, 64, 4, experts=128, experts_per_token=8,
       **{**_QWEN3, "family": "qwen3_moe"}),
    # Qwen1.5-MoE: 60 routed experts of 1408 plus a shared 5632-wide expert MLP per layer
    _a("qwen1.5-moe-a2.7b", 2048, 1408, 24, 16, 16, 151936, family="qwen2_moe", experts=60, experts_per_token=4,
       shared_intermediate=5632, rope_theta=1000000.0, rms_eps=1e-6, max_position=8192),
    # OLMoE (q/k norms over all heads)
    _a("olmoe-1b-7b", 2048, 1024, 16, 16, 16, 50304, family="olmoe", experts=64, experts_per_token=8),
    # Granite 3.1 MoE (40 experts of 512, tied 49k vocabulary)
    _a("granite-3.1-3b-a800m", 1536, 512, 32, 24, 8, 49155, family="granitemoe", experts=40, experts_per_token=8,
       tied=True, max_position=131072, rope_theta=10000000.0),
    # Phi-3.5-MoE (LayerNorms with biases, attention and lm_head biases)
    _a("phi-3.5-moe", 4096, 6400, 32, 32, 8, 32064, family="phimoe", experts=16, experts_per_token=2, bias=True,
       lm_head_bias=True, max_position=131072),
]}

def arch_from_hf_config(source: "str | os.PathLike | dict") -> ArchSpec:
    """An :class:`ArchSpec` from a transformers config: a model directory, a ``config.json`` path or
    the parsed dict. Reads only the file (no weights, no download); a key the file leaves out takes
    the transformers config class's default.

    Raises:
        ConfigError: missing file, invalid JSON, a missing key, an unsupported ``model_type``, or an
            MoE config with dense layers among its MoE ones.
    """
    from pathlib import Path

    where = "config"
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json here; pass a model directory or a catalog name")

        raw = read_json_object(path, ConfigError)
    raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw
    mtype = raw.get("model_type", "llama")
    if mtype not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {mtype!r} is not supported; "
                          f"supported: {', '.join(MODEL_TYPES)}")
    family = MODEL_TYPES[mtype]
    lay = FAMILY_LAYOUTS[family]
    experts = (raw.get("num_local_experts") or raw.get("num_experts")) if lay.experts_key else 0  # either spelling
    if experts and lay.sparse_step and (raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers")):
        raise ConfigError(f"{where}: dense MLP layers among the MoE ones (decoder_sparse_step / mlp_only_layers) "
                          "are not modelled; the estimate needs every layer MoE")
    try:
        heads = int(raw["num_attention_heads"])
        experts = int(experts or 0)
        hidden = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or lay.head_dim_default or 0)
        spec = ArchSpec(
            name=str(raw.get("_name_or_path") or Path(where).parent.name or mtype),
            hidden=hidden, intermediate=int(raw[lay.expert_width_key] if experts else raw["intermediate_size"]),
            layers=int(raw["num_hidden_layers"]), heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads), vocab=int(raw["vocab_size"]),
            tied=bool(raw.get("tie_word_embeddings", lay.tied_default)), family=family,
            max_position=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=_rope_theta(raw), rms_eps=float(raw.get(lay.eps_key, 1e-5)),
            head_dim_=head_dim if head_dim and head_dim != hidden // heads else 0,
            experts=experts, experts_per_token=int(raw.get("num_experts_per_tok") or 0) if experts else 0,
            shared_intermediate=int(raw["shared_expert_intermediate_size"]) if experts and lay.shared_expert else 0,
            bias=bool(raw.get(lay.bias_key, lay.bias_default)) if lay.bias_key else None,
            mlp_bias=bool(raw.get("mlp_bias", False)), lm_head_bias=bool(raw.get("lm_head_bias", False)),
            qk_norm=bool(raw.get("use_qk_norm", False)))
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} (needed for the memory estimate)") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a shape field is not a number ({e})") from None
    return spec


def _rope_theta(raw: dict) -> float:
    """``rope_theta``, or transformers 5's ``rope_parameters`` (per layer type: the full-attention one)."""
    params = raw.get("rope_parameters") or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


def get_arch(name: str) -> ArchSpec:
    """Catalog lookup with a one-line error naming the nearest entry."""
    from difflib import get_close_matches

    if name in CATALOG:
        return CATALOG[name]
    near = get_close_matches(name, list(CATALOG), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(CATALOG)}"
    raise ConfigError(f"unknown architecture {name!r}{hint}")
