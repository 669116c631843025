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
    """Decoder-only Llama-family shape.

    hidden: d_model. intermediate: MLP inner width. layers: decoder blocks. heads / kv_heads:
    attention heads (kv_heads < heads is GQA). vocab: embedding rows. tied: lm_head shares the
    embedding. family: ``llama`` | ``mistral`` | ``qwen2`` (qwen2 has q/k/v biases).
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_hf_config(self):
        """A transformers config (LlamaConfig / MistralConfig / Qwen2Config) for this shape."""
        import transformers

        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[self.family]
        return cls(hidden_size=self.hidden, intermediate_size=self.intermediate,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                   tie_word_embeddings=self.tied, max_position_embeddings=self.max_position,
                   rope_theta=self.rope_theta, rms_norm_eps=self.rms_eps)


def linear_shapes(arch: ArchSpec) -> list[tuple[str, int, int, bool]]:
    """One decoder layer's linear layers as ``(name, in_features, out_features, has_bias)``.

    q (hidden -> heads*head_dim), k/v (hidden -> kv_heads*head_dim), o (heads*head_dim -> hidden),
    gate/up (hidden -> intermediate), down (intermediate -> hidden). qwen2 has q/k/v biases.
    """
    q, kv, bias = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.family == "qwen2"
    return [("q_proj", arch.hidden, q, bias), ("k_proj", arch.hidden, kv, bias),
            ("v_proj", arch.hidden, kv, bias), ("o_proj", q, arch.hidden, False),
            ("gate_proj", arch.hidden, arch.intermediate, False),
            ("up_proj", arch.hidden, arch.intermediate, False),
            ("down_proj", arch.intermediate, arch.hidden, False)]


def param_counts(arch: ArchSpec) -> dict[str, int]:
    """Parameter counts by kind: ``linear`` (quantized in QLoRA), ``embed``, ``lm_head`` (0 when tied),
    ``norms`` + ``biases`` (kept 16-bit), and ``total``."""
    lin = sum(i * o for _, i, o, _ in linear_shapes(arch)) * arch.layers
    bias = sum(o for _, _, o, b in linear_shapes(arch) if b) * arch.layers
    embed = arch.vocab * arch.hidden
    head = 0 if arch.tied else embed
    norms = (2 * arch.layers + 1) * arch.hidden
    return {"linear": lin, "embed": embed, "lm_head": head, "norms": norms, "biases": bias,
            "total": lin + embed + head + norms + bias}


def _a(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **kw) -> ArchSpec:
    return ArchSpec(name, hidden, inter, layers, heads, kv, vocab, **kw)


_L3 = dict(vocab=128256, rope_theta=500000.0)
_QWEN = dict(vocab=152064, family="qwen2", rope_theta=1000000.0, rms_eps=1e-6, max_position=32768)

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
]}

_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


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
        spec = ArchSpec(
            name=str(raw.get("_name_or_path") or Path(where).parent.name or mtype),
            hidden=int(raw["hidden_size"]), intermediate=int(raw["intermediate_size"]),
            layers=int(raw["num_hidden_layers"]), heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads), vocab=int(raw["vocab_size"]),
            tied=bool(raw.get("tie_word_embeddings", False)), family=_FAMILIES[mtype],
            max_position=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_eps=float(raw.get("rms_norm_eps", 1e-5)))
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
