"""A transformers decoder as llama.cpp names it: GGUF architecture, hyperparameter keys and tensor names.

The architecture names and the HF -> GGUF tensor-name mapping come from the ``gguf`` package's own
tables (``MODEL_ARCH_NAMES``, ``get_tensor_name_map``); only the choice of architecture per HF class
is ours. Llama-architecture checkpoints (Llama, Mistral) store q/k rows in the "rotate half" order
of transformers' RoPE while llama.cpp's ``llama`` graph rotates adjacent pairs, so their q and k rows
(and a q/k LoRA's B rows) are permuted per head::

    W (n_head * head_dim, in) -> reshape (n_head, 2, head_dim/2, in) -> swap axes 1,2 -> reshape back

Qwen2/Qwen3 use NeoX RoPE in llama.cpp too: no permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qlora_trainer.errors import QloraError

# HF class -> (gguf MODEL_ARCH member name, permute q/k)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}


@dataclass
class GGUFArch:
    """How one HF model maps onto one llama.cpp architecture."""

    hf_class: str
    name: str  # llama.cpp's name, e.g. "llama", "qwen2"
    arch: Any  # gguf.MODEL_ARCH member
    permute_qk: bool
    config: Any  # the transformers config

    @property
    def n_head(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_head_kv(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_head)

    def tensor_name(self, hf_name: str) -> str:
        """GGUF name of HF parameter ``hf_name`` (``model.layers.0.self_attn.q_proj.weight`` ->
        ``blk.0.attn_q.weight``); a parameter llama.cpp's table lacks is a one-line error."""
        import gguf

        tmap = gguf.get_tensor_name_map(self.arch, int(self.config.num_hidden_layers))
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QloraError(f"export: tensor {hf_name!r} has no place in llama.cpp's {self.name!r} architecture")
        return name

    def permute_rows(self, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (out, ...) of q/k projections reordered for llama.cpp's RoPE (identity otherwise)."""
        if not self.permute_qk:
            return rows
        if ".q_proj." in hf_name:
            heads = self.n_head
        elif ".k_proj." in hf_name:
            heads = self.n_head_kv
        else:
            return rows
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_arch(config: Any) -> GGUFArch:
    """The llama.cpp architecture of a transformers config; unknown ones are a one-line refusal."""
    import gguf

    classes = list(getattr(config, "architectures", None) or [])
    if not classes and getattr(config, "model_type", None):
        classes = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}.get(config.model_type, str(config.model_type))]
    hf_class = classes[0] if classes else "?"
    if hf_class not in ARCHITECTURES:
        raise QloraError(f"export: architecture {hf_class} is not one this exporter maps to llama.cpp "
                         f"({', '.join(ARCHITECTURES)}); export --to vllm writes a 16-bit HF directory instead")
    member, permute = ARCHITECTURES[hf_class]
    arch = gguf.MODEL_ARCH[member]
    return GGUFArch(hf_class=hf_class, name=gguf.MODEL_ARCH_NAMES[arch], arch=arch, permute_qk=permute,
                    config=config)


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None) from transformers 4 (rope_theta/rope_scaling) or 5
    (rope_parameters) configs."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)) or 10000.0
    scaling = getattr(config, "rope_scaling", None) or params
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return float(theta), (None if kind in (None, "default") else dict(scaling))


def write_hparams(writer: Any, a: GGUFArch) -> None:
    """The hyperparameter keys llama.cpp reads for ``a``'s architecture (``{arch}.block_count``,
    ``context_length``, ``embedding_length``, ``feed_forward_length``, ``attention.head_count(_kv)``,
    ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ...)."""
    import gguf

    c = a.config
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(a.n_head)
    writer.add_head_count_kv(a.n_head_kv)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))
    theta, scaling = _rope(c)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(a.head_dim)
    if a.head_dim != c.hidden_size // a.n_head:
        writer.add_key_length(a.head_dim)
        writer.add_value_length(a.head_dim)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind != "llama3":  # llama3's factors are the rope_freqs tensor (extra_tensors)
            raise QloraError(f"export: RoPE scaling {kind!r} is not exported to GGUF (linear and llama3 are)")


def extra_tensors(a: GGUFArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs that the checkpoint does not hold: ``rope_freqs.weight`` (head_dim/2,)
    for Llama-3.1-style RoPE scaling (a per-frequency divisor: 1 for short wavelengths, ``factor`` for
    long ones, interpolated between)."""
    theta, scaling = _rope(a.config)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", torch.tensor(out, dtype=torch.float32)
