"""Gated MLP activations: SwiGLU ``silu(gate) * up`` (Llama family, Phi-3, OLMo2) and GeGLU
``gelu_tanh(gate) * up`` (Gemma 2/3's ``gelu_pytorch_tanh``): references, autograd Functions over the
Triton kernels, functions and the MLP module.

Both activations are act(g) = g * s with s = sigmoid(h(g)):
    silu:       h(g) = g
    gelu_tanh:  h(g) = 2k (g + a g^3),  k = sqrt(2/pi), a = 0.044715
                (0.5 g (1 + tanh(z)) = g * sigmoid(2z) since 1 + tanh(z) = 2 sigmoid(2z), z = k (g + a g^3))
so d act / dg = s + g * s * (1 - s) * h'(g), with h'(g) = 1 (silu) or 2k (1 + 3a g^2) (gelu_tanh):
    y  = act(g) * u
    dg = dy * u * (s + g * s * (1 - s) * h'(g))
    du = dy * act(g)
The Triton path saves only g and u (which the MLP must keep anyway) and recomputes s in the
backward; the torch reference also keeps act(g), an extra (N, I) activation per layer.

Fused gate/up projection (Phi-3's ``gate_up_proj``: one (..., 2I) output, gate its first half, up
its second, as ``chunk(2, dim=-1)``): :func:`gated_fused` reads both halves in place and its
backward writes d(gate_up) (..., 2I) as one tensor, with no copy of either half and no concatenation.

Sequence tiling (``SwiGLUMLP(chunk_tokens=C)``, ``performance.mlp_chunk_tokens``): the (B, T, H) input is
split along T into chunks of C tokens, each run under its own non-reentrant
``torch.utils.checkpoint.checkpoint``; only the chunk outputs (B, C, H) are concatenated. Autograd
then keeps no (B, T, I) intermediates at all, and forward and backward (which recomputes one chunk
at a time) hold one chunk's (B, C, I) gate/up/silu/product at once instead of T tokens' worth.
Works nested inside the per-layer checkpoint; LoRA dropout masks drawn inside a chunk are
reproduced by the recompute (checkpoint restores the RNG state, ``preserve_rng_state=True``).
Cost: one extra forward of the MLP per step (two with per-layer checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backend import resolve_backend
from .grouped_linear import grouped_projections


# activation -> the self-check's kernel name (``selfcheck.KERNELS``; each is switched to its reference alone)
ACTIVATIONS = {"silu": "swiglu", "gelu_tanh": "geglu"}


def _activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated MLP: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up, as in transformers' ``LlamaMLP`` (silu) / ``Gemma2MLP`` (``gelu_pytorch_tanh``).
    gate, up: (..., I)."""
    if _activation(activation) == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def _launchers(activation: str):
    """(forward, backward) Triton launchers of ``activation``."""
    from . import _triton_swiglu as k

    return (k.geglu_fwd, k.geglu_bwd) if activation == "gelu_tanh" else (k.swiglu_fwd, k.swiglu_bwd)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (N, I) with unit stride on I (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """Triton gated activation. forward(gate (..., I), up (..., I), activation) -> (..., I)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        shape = gate.shape
        # column views (grouped gate/up) are copied: the launches the step model counts (benchmarks/speed)
        gate, up = _rows(gate.contiguous()), _rows(up.contiguous())
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return _launchers(activation)[0](gate, up).view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = _launchers(ctx.activation)[1](_rows(dy.contiguous()), gate, up)
        return dg.view(dy.shape), du.view(dy.shape), None


class FusedGateUpFunction(torch.autograd.Function):
    """Triton gated activation on a fused projection. forward(gate_up (..., 2I), activation) ->
    act(gate_up[..., :I]) * gate_up[..., I:] (..., I); the backward returns d(gate_up) (..., 2I)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        gu = _rows(gate_up)
        i = gu.shape[1] // 2
        ctx.save_for_backward(gu)
        ctx.activation, ctx.shape = activation, gate_up.shape
        return _launchers(activation)[0](gu[:, :i], gu[:, i:]).view(*gate_up.shape[:-1], i)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gu,) = ctx.saved_tensors
        i = gu.shape[1] // 2
        d = torch.empty_like(gu)  # (N, 2I): d_gate and d_up written into its halves
        _launchers(ctx.activation)[1](_rows(dy.contiguous()), gu[:, :i], gu[:, i:], out=(d[:, :i], d[:, i:]))
        return d.view(ctx.shape), None


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto", activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for gate, up (..., I) of one shape and dtype (``backend``: ``auto|triton|torch``;
    ``activation``: ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU))."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    if resolve_backend(backend, gate.device, ACTIVATIONS[_activation(activation)]) == "triton":
        return SwiGLUFunction.apply(gate, up, activation)
    return swiglu_reference(gate, up, activation)


def gated_fused(gate_up: torch.Tensor, backend: str = "auto", activation: str = "silu") -> torch.Tensor:
    """act(gate) * up with gate, up = gate_up.chunk(2, dim=-1), for gate_up (..., 2I) -> (..., I)
    (Phi-3's MLP: ``up * silu(gate)``; the same product)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gated_fused: the last dimension of gate_up {tuple(gate_up.shape)} must be even")
    if resolve_backend(backend, gate_up.device, ACTIVATIONS[_activation(activation)]) == "triton":
        return FusedGateUpFunction.apply(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up, activation)


class SwiGLUMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` with the gating in one kernel: Llama/Mistral/Qwen2/
    OLMo2 (``activation="silu"``), Gemma 2/3 (``"gelu_tanh"``); Phi-3's fused projection with
    ``gate_up_proj`` (gate_proj and up_proj None): ``down(act(gate) * up)``, gate, up = its
    output's two halves.

    Takes over the original MLP's projection modules (plain Linear, bnb ``Linear4bit`` or
    ``LoRALinear`` alike: they are only called), so parameter names are unchanged.
    ``chunk_tokens > 0`` tiles the sequence dimension (see the module docstring); 0 = off."""

    def __init__(self, gate_proj: nn.Module | None, up_proj: nn.Module | None, down_proj: nn.Module,
                 backend: str = "auto", chunk_tokens: int = 0, group_projections: bool = False, *,
                 activation: str = "silu", gate_up_proj: nn.Module | None = None) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"SwiGLUMLP: chunk_tokens must be >= 0 (got {chunk_tokens})")
        if (gate_up_proj is None) == (gate_proj is None or up_proj is None):
            raise ValueError("SwiGLUMLP: give gate_proj and up_proj, or gate_up_proj alone")
        if gate_up_proj is not None:  # registration order = Phi3MLP's (parameter order, state dicts)
            self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        else:
            self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = _activation(activation)
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        self.group_projections = group_projections  # gate/up as one grouped matmul (grouped_linear.py)
        if chunk_tokens and isinstance(getattr(down_proj, "recompute_skips_base", None), bool):
            down_proj.recompute_skips_base = True  # each chunk's recompute stops before down_proj's base matmul

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H) through (..., I) gate/up activations, untiled."""
        if "gate_up_proj" in self._modules:  # one (..., 2I) projection
            return self.down_proj(gated_fused(self.gate_up_proj(x), self.backend, self.activation))
        gate_up = None
        if self.group_projections:
            gate_up = grouped_projections(x, self, "gate_up", (self.gate_proj, self.up_proj))
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(swiglu(gate, up, self.backend, self.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H); with ``chunk_tokens`` = C > 0 and x (..., T, H) with T > C, in
        ceil(T / C) chunks of x[..., t:t+C, :], each checkpointed when autograd records."""
        c = self.chunk_tokens
        if c <= 0 or x.dim() < 2 or x.shape[-2] <= c:
            return self._mlp(x)
        chunks = x.split(c, dim=-2)  # views (..., <=C, H)
        if torch.is_grad_enabled():
            outs = [checkpoint(self._mlp, xc, use_reentrant=False) for xc in chunks]
        else:
            outs = [self._mlp(xc) for xc in chunks]
        return torch.cat(outs, dim=-2)

    def extra_repr(self) -> str:
        return (f"{self.activation}, backend={self.backend}" + (f", chunk_tokens={self.chunk_tokens}" if self.chunk_tokens else "")
                + (", grouped" if self.group_projections else ""))
