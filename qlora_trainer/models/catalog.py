"""Architecture catalog: the shapes of the models users fine-tune, read by the estimator, the
synthetic-model builder and ``random:<name>`` model paths.

(The memory issue owns the full catalog; entries here are the shared contract.)
"""

from __future__ import annotations

from dataclasses import dataclass


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


CATALOG: dict[str, ArchSpec] = {a.name: a for a in [
    # the demo's model: byte-level vocabulary (256 bytes + 4 specials), a few layers, CPU-fast
    ArchSpec("tiny", hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=260,
             max_position=1024),
    ArchSpec("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    ArchSpec("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, max_position=8192, rope_theta=500000.0),
]}


def get_arch(name: str) -> ArchSpec:
    """Catalog lookup with a one-line error naming the nearest entry."""
    from difflib import get_close_matches

    from qlora_trainer.errors import ConfigError

    if name in CATALOG:
        return CATALOG[name]
    near = get_close_matches(name, list(CATALOG), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(CATALOG)}"
    raise ConfigError(f"unknown architecture {name!r}{hint}")
