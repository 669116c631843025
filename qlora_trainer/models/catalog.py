"""Architecture catalog: the shapes of the models users fine-tune, read by the estimator, the
synthetic-model builder and ``random:<name>`` model paths.

Shapes are copied from each model's ``config.json``; :func:`arch_from_hf_config` reads any other
Llama-family config on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qlora_trainer.errors import ConfigError
from qlora_trainer.io import read_json_object


@dataclass(frozen=True)
class ArchSpec:
    """Decoder-only transformer shape.

    hidden: d_model. intermediate: MLP inner width (MoE: each expert's, see below). layers: decoder
    blocks. heads / kv_heads: attention heads (kv_heads < heads is GQA). vocab: embedding rows.
    tied: lm_head shares the embedding. family: ``llama`` | ``mistral`` | ``qwen2`` (q/k/v biases) |
    ``qwen3`` (q/k norms) | ``gemma2`` | ``gemma3`` | ``phi3`` (fused qkv and gate_up) | ``olmo2``
    (q/k norms) | ``mixtral`` | ``qwen3_moe``. ``head_dim_``: the attention head width when it is not
    hidden / heads (Qwen3, Gemma). MoE (``experts`` > 0): every layer's MLP is ``experts`` experts
    of width ``intermediate`` (fused 3-D weights), ``experts_per_token`` routed per token, and a
    16-bit (experts, hidden) router.
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

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def to_hf_config(self):
        """A transformers config of this shape (``LlamaConfig``, ``Qwen3MoeConfig``, ...)."""
        import transformers

        cls = getattr(transformers, _HF_CONFIGS[self.family])
        extra: dict = {"head_dim": self.head_dim} if self.head_dim_ else {}
        inter = self.intermediate
        if self.family == "mixtral":
            extra |= {"num_local_experts": self.experts, "num_experts_per_tok": self.experts_per_token}
        elif self.family == "qwen3_moe":
            extra |= {"num_experts": self.experts, "num_experts_per_tok": self.experts_per_token,
                      "moe_intermediate_size": self.intermediate, "decoder_sparse_step": 1}
        return cls(hidden_size=self.hidden, intermediate_size=inter,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                   tie_word_embeddings=self.tied, max_position_embeddings=self.max_position,
                   rope_theta=self.rope_theta, rms_norm_eps=self.rms_eps, **extra)


_HF_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config",
               "olmo2": "Olmo2Config", "mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig"}


def linear_shapes(arch: ArchSpec) -> list[tuple[str, int, int, bool]]:
    """One decoder layer's linear layers as ``(name, in_features, out_features, has_bias)``.

    q (hidden -> heads*head_dim), k/v (hidden -> kv_heads*head_dim), o (heads*head_dim -> hidden),
    gate/up (hidden -> intermediate), down (intermediate -> hidden). qwen2 has q/k/v biases.
    Phi-3 fuses q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``). An MoE arch's MLP is its experts
    (:func:`expert_shapes`), not linear layers: only the attention projections are listed.
    """
    q, kv, bias = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.family == "qwen2"
    h, i = arch.hidden, arch.intermediate
    if arch.family == "phi3":
        attn = [("qkv_proj", h, q + 2 * kv, False), ("o_proj", q, h, False)]
        mlp = [("gate_up_proj", h, 2 * i, False), ("down_proj", i, h, False)]
    else:
        attn = [("q_proj", h, q, bias), ("k_proj", h, kv, bias), ("v_proj", h, kv, bias), ("o_proj", q, h, False)]
        mlp = [("gate_proj", h, i, False), ("up_proj", h, i, False), ("down_proj", i, h, False)]
    return attn if arch.is_moe else attn + mlp


def expert_shapes(arch: ArchSpec) -> list[tuple[str, int, int]]:
    """One MoE layer's fused expert weights as ``(name, in, out)`` per expert (E = ``arch.experts``
    of each): ``gate_up_proj`` (hidden -> 2 * intermediate), ``down_proj`` (intermediate -> hidden).
    Empty for a dense arch."""
    if not arch.is_moe:
        return []
    return [("gate_up_proj", arch.hidden, 2 * arch.intermediate), ("down_proj", arch.intermediate, arch.hidden)]


def param_counts(arch: ArchSpec) -> dict[str, int]:
    """Parameter counts by kind: ``linear`` (quantized in QLoRA), ``experts`` (MoE expert weights,
    quantized by our NF4 path), ``router`` (MoE, 16-bit), ``embed``, ``lm_head`` (0 when tied),
    ``norms`` + ``biases`` (kept 16-bit), and ``total``. Norms: two per layer and the final one, plus
    Gemma 2/3's two extra per layer, and per-head q/k norms (Qwen3, Gemma 3: head_dim each; OLMo2:
    over all q / k heads)."""
    lin = sum(i * o for _, i, o, _ in linear_shapes(arch)) * arch.layers
    bias = sum(o for _, _, o, b in linear_shapes(arch) if b) * arch.layers
    experts = arch.experts * sum(i * o for _, i, o in expert_shapes(arch)) * arch.layers
    router = arch.experts * arch.hidden * arch.layers
    embed = arch.vocab * arch.hidden
    head = 0 if arch.tied else embed
    per_layer = (4 if arch.family in ("gemma2", "gemma3") else 2) * arch.hidden
    if arch.family in ("qwen3", "qwen3_moe", "gemma3"):
        per_layer += 2 * arch.head_dim
    elif arch.family == "olmo2":
        per_layer += (arch.heads + arch.kv_heads) * arch.head_dim
    norms = arch.layers * per_layer + arch.hidden
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
    # mixtures of experts: intermediate is each expert's width
    _a("mixtral-8x7b", 4096, 14336, 32, 32, 8, 32000, family="mixtral", experts=8, experts_per_token=2,
       max_position=32768, rope_theta=1000000.0),
    _a("qwen3-30b-a3b", 2048, 768, 48, 32, 4, experts=128, experts_per_token=8, **{**_QWEN3, "family": "qwen3_moe"}),
    _a("qwen3-235b-a22b", 4096, 1536, 94, 64, 4, experts=128, experts_per_token=8,
       **{**_QWEN3, "family": "qwen3_moe"}),
]}

_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
             "mixtral": "mixtral", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
             "phi3": "phi3", "olmo2": "olmo2"}


def arch_from_hf_config(source: "str | os.PathLike | dict") -> ArchSpec:
    """An :class:`ArchSpec` from a transformers config: a model directory, a ``config.json`` path or
    the parsed dict. Reads only the file (no weights, no download).

    Raises:
        ConfigError: missing file, invalid JSON, a missing key, or an unsupported ``model_type``.
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
    if mtype not in _FAMILIES:
        raise ConfigError(f"{where}: model_type {mtype!r} is not supported; "
                          f"supported: {', '.join(_FAMILIES)}")
    try:
        heads = int(raw["num_attention_heads"])
        experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        inter = raw["moe_intermediate_size"] if mtype == "qwen3_moe" else raw["intermediate_size"]
        hidden = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or 0)
        spec = ArchSpec(
            name=str(raw.get("_name_or_path") or Path(where).parent.name or mtype),
            hidden=hidden, intermediate=int(inter),
            layers=int(raw["num_hidden_layers"]), heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads), vocab=int(raw["vocab_size"]),
            tied=bool(raw.get("tie_word_embeddings", False)), family=_FAMILIES[mtype],
            max_position=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
            head_dim_=head_dim if head_dim and head_dim != hidden // heads else 0,
            experts=experts, experts_per_token=int(raw.get("num_experts_per_tok") or 0) if experts else 0)
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} (needed for the memory estimate)") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a shape field is not a number ({e})") from None
    return spec


def get_arch(name: str) -> ArchSpec:
    """Catalog lookup with a one-line error naming the nearest entry."""
    from difflib import get_close_matches

    if name in CATALOG:
        return CATALOG[name]
    near = get_close_matches(name, list(CATALOG), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(CATALOG)}"
    raise ConfigError(f"unknown architecture {name!r}{hint}")
