"""Swap a transformers model's hot spots for kernel-backed modules where the math matches.

Module replacement only (no patching of transformers functions), keeping every parameter object
and every parameter name, so optimizers, LoRA adapters and state dicts are unaffected:

* ``*RMSNorm``   -> :class:`qlora_trainer.kernels.rmsnorm.RMSNorm` (same ``weight``), in the
                    family's weighting: Llama's, or the weight applied in fp32 before the cast
                    (OLMo2) with Gemma's ``1 + w`` offset (Gemma 2/3)
* ``*MLP``       -> :class:`qlora_trainer.kernels.swiglu.SwiGLUMLP` (same gate/up/down modules,
                    which may be ``nn.Linear``, bnb ``Linear4bit`` or ``LoRALinear``): SwiGLU, GeGLU
                    (Gemma's ``gelu_pytorch_tanh``), or Phi-3's fused ``gate_up_proj`` kept whole
* ``*Attention`` -> :class:`RoPEAttention` below: the same q/k/v/o modules and the model's own
                    attention implementation (sdpa / eager / flash), with RoPE through our kernel.
* ``*DecoderLayer`` -> :class:`FusedDecoderLayer` below (``fuse_add_norm``): the same four children
                    (six in Gemma 2/3; Phi-3's zero-p residual dropouts dropped); the attention output's residual add runs fused with the norm
                    after it (``post_attention_layernorm``; Gemma: ``pre_feedforward_layernorm``).

Only the classes named in ``_NORMS`` / ``_MLPS`` / ``_ATTENTIONS`` / ``_DECODERS`` are replaced: their
semantics are known to match the kernels, each checked against the family's own module on forward
and gradients (tests/models/test_adapt_families.py, tests/models/test_adapt_family_modules.py).
Llama, Mistral, Qwen2, Qwen3 (q/k norms on each head before RoPE, run by :class:`RoPEAttention`),
Qwen3-MoE and Mixtral (all but the experts), Gemma 2/3's norms and GeGLU MLPs, Gemma 3's attention
(its q/k norms inside), Phi-3's norms, attention and MLP (the fused ``qkv_proj`` / ``gate_up_proj``
kept whole, their outputs split), OLMo2's norms, SwiGLU MLP and attention (its q/k norms over all
heads, before the split into heads). Not matched, so transformers' modules run (the start-up log
names them, each with the reason: :func:`kept_reason`): Gemma 2's soft-capped attention, the
decoder layers of Phi-3 with ``resid_pdrop`` > 0 (dropout on each block's output before its residual
add; 0 in its hub configs, where the layer is fused as Llama's) and OLMo2 (post-norm: each
norm precedes its residual add, so there is no add-then-norm to fuse), Gemma's embedding scaling,
partial-rotary attention, MoE routing. Caveat: transformers'
``output_attentions`` / ``output_hidden_states`` capture looks for its own attention and decoder-layer
classes and records nothing from :class:`RoPEAttention` / :class:`FusedDecoderLayer`; training does
not use it (``performance.fused_add_norm: false`` keeps transformers' decoder layers).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qlora_trainer.kernels.grouped_linear import grouped_projections
from qlora_trainer.kernels.rmsnorm import RMSNorm
from qlora_trainer.kernels.rope import apply_rope
from qlora_trainer.kernels.swiglu import SwiGLUMLP
from qlora_trainer.models.checkpointing import CheckpointedLayer

logger = logging.getLogger(__name__)

_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Qwen3Moe", "Mixtral", "Qwen2Moe")
_LLAMA_NORM: dict[str, float | bool] = {}
_GEMMA_NORM = {"offset": 1.0, "weight_fp32": True}  # (x_f32 * rstd * (1 + w_f32)).to(dtype)
# norm class -> its weighting (kernels.rmsnorm): Llama's cast-then-weight, or the weight in fp32
_NORMS = ({f"{f}RMSNorm": _LLAMA_NORM for f in _FAMILIES} | {"Phi3RMSNorm": _LLAMA_NORM}
          | {"Gemma2RMSNorm": _GEMMA_NORM, "Gemma3RMSNorm": _GEMMA_NORM, "Olmo2RMSNorm": {"weight_fp32": True}}
          | {"GemmaRMSNorm": _GEMMA_NORM, "Olmo3RMSNorm": {"weight_fp32": True}}
          | {f"{f}RMSNorm": _LLAMA_NORM for f in ("Granite", "SmolLM3", "Olmoe", "GraniteMoe", "Glm4")})
_MLPS = {f"{f}MLP" for f in _FAMILIES} | {"Olmo2MLP", "Gemma2MLP", "Gemma3MLP", "Phi3MLP",
                                           "GemmaMLP", "Olmo3MLP", "GraniteMLP", "SmolLM3MLP", "Glm4MLP", "CohereMLP"}
# the config's activation name -> our gated kernel's (kernels.swiglu.ACTIVATIONS)
_GATED_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_ATTENTIONS = {f"{f}Attention" for f in _FAMILIES} | {"Gemma3Attention", "Phi3Attention", "Olmo2Attention"}
_DECODERS = {f"{f}DecoderLayer" for f in _FAMILIES} | {"Gemma2DecoderLayer", "Gemma3DecoderLayer",
                                                        "Phi3DecoderLayer"}
_DECODER_CHILDREN = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# Gemma 2/3: a norm after each block as well (the "sandwich" layout)
_SANDWICH_CHILDREN = _DECODER_CHILDREN + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
# Phi-3: dropout on each block's output before its residual add (Llama's layer when both p are 0)
_RESID_DROPOUTS = ("resid_attn_dropout", "resid_mlp_dropout")
_BACKENDS = ("auto", "triton", "torch")
# plain attributes the attention interfaces read off the module (``self`` is passed to them)
_ATTN_ATTRS = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling",
               "attention_dropout", "is_causal", "layer_type")


class RoPEAttention(nn.Module):
    """Llama-family self-attention whose rotary embedding runs through ``kernels.rope``.

    Same computation as ``LlamaAttention.forward`` (Mistral/Qwen2 add ``sliding_window``), but q
    and k are rotated in the token-major (B, T, H, D) layout the projections produce, before the
    transpose to (B, H, T, D) that the attention kernels take. Build with :meth:`from_module`.
    """

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module,
                 *, config, layer_idx: int, head_dim: int, num_key_value_groups: int,
                 scaling: float, attention_dropout: float = 0.0, is_causal: bool = True,
                 sliding_window: int | None = None, backend: str = "auto",
                 group_projections: bool = False, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        if q_norm is not None:  # Qwen3: RMSNorm over each head's D features of q and k, before RoPE
            self.q_norm, self.k_norm = q_norm, k_norm
        # OLMo2: q/k norms over all heads' features (Hq * D), on the projections before the split
        self.qk_norm_whole = q_norm is not None and q_norm.weight.shape[-1] != head_dim
        self.config, self.layer_idx, self.head_dim = config, layer_idx, head_dim
        self.num_key_value_groups, self.scaling = num_key_value_groups, scaling
        self.attention_dropout, self.is_causal = attention_dropout, is_causal
        self.sliding_window, self.backend = sliding_window, backend
        self.group_projections = group_projections  # q/k/v as one grouped matmul (kernels.grouped_linear)

    @classmethod
    def from_module(cls, attn: nn.Module, backend: str = "auto") -> "RoPEAttention":
        """Take over a Llama-family attention's projections, settings and (Qwen3) q/k norms; Phi-3's
        fused ``qkv_proj`` is kept whole (its output split into q, k, v)."""
        attrs = {a: getattr(attn, a) for a in _ATTN_ATTRS if hasattr(attn, a)}
        window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if hasattr(attn, "qkv_proj"):
            new = cls(None, None, None, attn.o_proj, config=attrs.pop("config"), layer_idx=attrs.pop("layer_idx"),
                      head_dim=attrs.pop("head_dim"), num_key_value_groups=attrs.pop("num_key_value_groups"),
                      scaling=attrs.pop("scaling"), attention_dropout=attrs.pop("attention_dropout", 0.0),
                      is_causal=attrs.pop("is_causal", True), sliding_window=window, backend=backend)
            new.qkv_proj = attn.qkv_proj
            kv = attn.num_key_value_heads * new.head_dim
            new.qkv_split = (attn.qkv_proj.out_features - 2 * kv, kv, kv)
            return new
        new = cls(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, config=attrs.pop("config"),
                  layer_idx=attrs.pop("layer_idx"), head_dim=attrs.pop("head_dim"),
                  num_key_value_groups=attrs.pop("num_key_value_groups"),
                  scaling=attrs.pop("scaling"), attention_dropout=attrs.pop("attention_dropout", 0.0),
                  is_causal=attrs.pop("is_causal", True), sliding_window=window, backend=backend,
                  q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
        for name, value in attrs.items():  # e.g. Qwen2's layer_type
            setattr(new, name, value)
        return new

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                past_key_value=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, hidden); position_embeddings = (cos, sin), each (B|1, T, D).
        The KV cache comes as ``cache`` (transformers >= 5.24), ``past_key_values`` or
        ``past_key_value`` (earlier releases); whichever is set is updated.
        Returns (attn_output (B, T, hidden), attention weights or None)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = None
        if "qkv_proj" in self._modules:  # Phi-3: one fused projection
            qkv = self.qkv_proj(hidden_states).split(self.qkv_split, dim=-1)
        elif self.group_projections:
            qkv = grouped_projections(hidden_states, self, "qkv", (self.q_proj, self.k_proj, self.v_proj))
        if qkv is None:
            qkv = [p(hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj)]
        q, k = qkv[0], qkv[1]  # (B, T, Hq * D), (B, T, Hk * D)
        if "q_norm" in self._modules and self.qk_norm_whole:  # RMSNorm over all heads (OLMo2)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(hidden_shape), k.view(hidden_shape)  # (B, T, Hq, D), (B, T, Hk, D)
        if "q_norm" in self._modules and not self.qk_norm_whole:  # per-head RMSNorm over D (Qwen3, Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        v = qkv[2].view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin, backend=self.backend)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        kv_cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          eager_attention_forward)
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, backend={self.backend}"


class FusedDecoderLayer(nn.Module):
    """A Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma decoder layer whose attention residual add is fused with the norm after it:

        (h, x) = input_layernorm(x, return_residual=True);  a = self_attn(h)
        (h2, s) = post_attention_layernorm(a, x)    # s = x + a, h2 = norm(s): one kernel
        return s + mlp(h2)

    (``kernels.rmsnorm.add_rms_norm``.) The input norm passes x through, so that in the backward
    x's residual-branch gradient is summed inside the input norm's backward kernel, and the
    post-attention kernel sums s's two gradients: two gradient adds fewer per layer.

    The same children under the same names (``self_attn``, ``mlp``, ``input_layernorm``,
    ``post_attention_layernorm``), so parameter names, state dicts, adapters, checkpointing and
    grouping are unchanged. The MLP's residual add stays unfused: fusing it with the *next*
    layer's input norm would need the model loop (which calls each layer with the summed hidden
    state and applies the final norm itself) to pass the un-added MLP output on. Build with
    :meth:`from_module`.

    Gemma 2/3's layer (``pre_feedforward_layernorm`` and ``post_feedforward_layernorm`` given) norms
    each block's output before its residual add, and the add is followed by the MLP's input norm:

        (h, x) = input_layernorm(x, return_residual=True);  a = post_attention_layernorm(self_attn(h))
        (h2, s) = pre_feedforward_layernorm(a, x)    # s = x + a, h2 = norm(s): one kernel
        return s + post_feedforward_layernorm(mlp(h2))
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, pre_feedforward_layernorm: nn.Module | None = None,
                 post_feedforward_layernorm: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp  # registration order = transformers' (state-dict keys)
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm
        if pre_feedforward_layernorm is not None:  # Gemma 2/3
            self.pre_feedforward_layernorm = pre_feedforward_layernorm
            self.post_feedforward_layernorm = post_feedforward_layernorm

    @classmethod
    def from_module(cls, layer: nn.Module) -> "FusedDecoderLayer | None":
        """Take over a ``Llama/Mistral/Qwen2/Gemma2/Gemma3/Phi3DecoderLayer``'s children and plain
        attributes (e.g. ``hidden_size``); None when it has other children or transformers' own
        gradient checkpointing is on for it (which only its own class honours). Phi-3's residual
        dropouts are dropped when both have p = 0 (the identity: its hub configs' ``resid_pdrop``);
        otherwise None."""
        children = tuple(layer._modules)
        if children == _DECODER_CHILDREN + _RESID_DROPOUTS and all(
                float(getattr(layer._modules[d], "p", 1.0)) == 0.0 for d in _RESID_DROPOUTS):
            children = _DECODER_CHILDREN
        if children not in (_DECODER_CHILDREN, _SANDWICH_CHILDREN) or getattr(layer, "gradient_checkpointing", False):
            return None
        new = cls(*(layer._modules[n] for n in children))
        for name, value in vars(layer).items():
            if not name.startswith("_") and name not in ("training", "gradient_checkpointing"):
                setattr(new, name, value)
        return new

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """hidden_states (B, T, H) -> (B, T, H). Every other argument (``position_embeddings``,
        ``use_cache``, the KV cache as ``cache`` (transformers >= 5.24) or ``past_key_values``
        (5.17-5.23), ...) goes to ``self_attn`` under the name it came with, as transformers' layer does."""
        if "pre_feedforward_layernorm" in self._modules:
            return self._sandwich(hidden_states, attention_mask, position_ids, **kwargs)
        fused = isinstance(self.input_layernorm, RMSNorm) and isinstance(self.post_attention_layernorm, RMSNorm)
        if fused:  # h = norm(x); residual = x, as the input norm's second output
            h, residual = self.input_layernorm(hidden_states, return_residual=True)
        else:  # norms our kernels do not take over
            h, residual = self.input_layernorm(hidden_states), hidden_states
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        if fused:
            h, residual = self.post_attention_layernorm(h, residual)  # (B, T, H) each: norm(x + a), x + a
        else:
            residual = residual + h
            h = self.post_attention_layernorm(residual)
        return residual + self.mlp(h)

    def _sandwich(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """Gemma 2/3's layer, (B, T, H) -> (B, T, H): the attention block's residual add fused with
        ``pre_feedforward_layernorm`` (see the class docstring)."""
        fused = isinstance(self.input_layernorm, RMSNorm) and isinstance(self.pre_feedforward_layernorm, RMSNorm)
        if fused:
            h, residual = self.input_layernorm(hidden_states, return_residual=True)
        else:
            h, residual = self.input_layernorm(hidden_states), hidden_states
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        h = self.post_attention_layernorm(h)
        if fused:
            h, residual = self.pre_feedforward_layernorm(h, residual)  # norm(x + a), x + a
        else:
            residual = residual + h
            h = self.pre_feedforward_layernorm(residual)
        return residual + self.post_feedforward_layernorm(self.mlp(h))


def _gated_mlp(mlp: nn.Module, backend: str, chunk_tokens: int, group_projections: bool) -> SwiGLUMLP | None:
    """Our gated MLP over ``mlp``'s projections (gate/up/down, or Phi-3's gate_up/down) when its
    activation is one our kernel computes (:data:`_GATED_ACTS`); None otherwise. Gemma's MLPs read
    ``config.hidden_activation``, the others ``config.hidden_act``."""
    cfg = getattr(mlp, "config", None)
    name = getattr(cfg, "hidden_activation", None) if type(mlp).__name__.startswith("Gemma") else None
    act = _GATED_ACTS.get(name or getattr(cfg, "hidden_act", None))
    kw = {"chunk_tokens": chunk_tokens, "group_projections": group_projections, "activation": act}
    if act is None or not hasattr(mlp, "down_proj"):
        return None
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        return SwiGLUMLP(None, None, mlp.down_proj, backend, gate_up_proj=mlp.gate_up_proj, **kw)
    if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        return SwiGLUMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, backend, **kw)
    return None


def _full_rotary(attn: nn.Module) -> bool:
    """RoPE over the whole head (our kernel's case), not a partial rotary factor (e.g. some Phi configs)."""
    return float(getattr(getattr(attn, "config", None), "partial_rotary_factor", None) or 1.0) == 1.0


def _fused_decoder(module: nn.Module) -> nn.Module | None:
    """A :class:`FusedDecoderLayer` for a transformers decoder layer, also one already wrapped by
    ``checkpointing.CheckpointedLayer`` (re-wrapped); None for anything else."""
    if isinstance(module, CheckpointedLayer):
        inner = _fused_decoder(module._layer)
        return None if inner is None else CheckpointedLayer(inner, module.offloader)
    return FusedDecoderLayer.from_module(module) if type(module).__name__ in _DECODERS else None


def adapt_model(model: nn.Module, backend: str = "auto", *, mlp_chunk_tokens: int = 0,
                group_projections: bool = False, fuse_add_norm: bool = True) -> nn.Module:
    """Replace RMSNorm, SwiGLU MLP and attention (RoPE) modules of ``model`` in place by
    kernel-backed ones (see the module docstring); returns ``model``. Idempotent.

    ``backend`` (``auto|triton|torch``) is stored on each new module and resolved per call by
    ``kernels.dispatch.resolve_backend`` (``auto``: Triton on CUDA, torch references on CPU).
    ``mlp_chunk_tokens`` > 0 makes each new MLP sequence-tiled (``SwiGLUMLP(chunk_tokens=...)``:
    chunks of that many tokens, each checkpointed); 0 = untiled. Already-adapted modules are kept.
    ``group_projections``: q/k/v and gate/up run as one grouped matmul each where their adapters
    allow (``kernels.grouped_linear``; the modules and parameter names are unchanged).
    ``fuse_add_norm``: decoder layers become :class:`FusedDecoderLayer` (attention residual add +
    ``post_attention_layernorm`` in one kernel on the Triton backend; the same ops on torch).
    """
    if mlp_chunk_tokens < 0:
        raise ValueError(f"adapt_model: mlp_chunk_tokens must be >= 0, got {mlp_chunk_tokens}")
    if backend not in _BACKENDS:
        raise ValueError(f"adapt_model: backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    counts = {"norm": 0, "mlp": 0, "attention": 0, "decoder": 0}
    for name, module in list(model.named_modules()):  # parents before children: a new layer's
        cls = type(module).__name__                    # children are replaced through it afterwards
        if fuse_add_norm and (layer := _fused_decoder(module)) is not None:
            new, kind = layer, "decoder"
        elif cls in _NORMS:
            new, kind = RMSNorm.from_module(module, backend, **_NORMS[cls]), "norm"
        elif cls in _MLPS and (mlp := _gated_mlp(module, backend, mlp_chunk_tokens, group_projections)) is not None:
            new, kind = mlp, "mlp"
        elif cls in _ATTENTIONS and _full_rotary(module):
            new, kind = RoPEAttention.from_module(module, backend), "attention"
            new.group_projections = group_projections
        else:
            continue
        new.train(module.training)
        model.set_submodule(name, new)
        counts[kind] += 1
    logger.info("adapt_model(backend=%s): replaced %d RMSNorm, %d MLP, %d attention, %d decoder-layer modules",
                backend, counts["norm"], counts["mlp"], counts["attention"], counts["decoder"])
    kept = transformers_modules(model)
    if kept:
        logger.info("transformers' own modules kept: %s",
                    ", ".join(f"{n} x{c} ({kept_reason(n, model)})" for n, c in kept.items()))
    return model


_KINDS = ("RMSNorm", "LayerNorm", "MLP", "Attention", "DecoderLayer", "SparseMoeBlock", "Experts",
          "ScaledWordEmbedding")
# transformers class -> why our kernels leave it (the start-up log's reasons)
_KEPT_WHY = {
    "Gemma2Attention": "soft-capped attention logits",
    "Phi3DecoderLayer": "resid_pdrop > 0: dropout on each block's output before its residual add",
    "Olmo2DecoderLayer": "post-norm layer: each norm precedes its residual add, no add-then-norm to fuse",
}


def kept_reason(cls_name: str, model: nn.Module | None = None) -> str:
    """One phrase: why :func:`adapt_model` leaves transformers' ``cls_name`` in place."""
    if cls_name in _KEPT_WHY:
        return _KEPT_WHY[cls_name]
    if cls_name.endswith("ScaledWordEmbedding"):
        return "embedding scaling (one multiply), left to transformers"
    if cls_name.endswith("SparseMoeBlock"):
        return "routing, left to transformers"
    if cls_name.endswith("Experts"):
        return "16-bit experts (model.quantization: nf4 makes them ours)"
    if cls_name.endswith("Attention") and model is not None and not _full_rotary(model):
        return "partial rotary embedding"
    return "our kernels do not match its math"


def transformers_modules(model: nn.Module) -> dict[str, int]:
    """Class name -> count of the norm / MLP / attention / decoder-layer modules of ``model`` that
    are still transformers' (not replaced by :func:`adapt_model`)."""
    from collections import Counter

    return dict(Counter(type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("transformers.") and type(m).__name__.endswith(_KINDS)))
