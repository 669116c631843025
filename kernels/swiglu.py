"""SwiGLU gate ``silu(gate) * up``: reference, autograd Function over the Triton kernel, function.

With s = sigmoid(g), silu(g) = g * s and d silu / dg = s + g * s * (1 - s) = s * (1 + g * (1 - s)):
    y  = g * s * u
    dg = dy * u * s * (1 + g * (1 - s))
    du = dy * g * s
The Triton path saves only g and u (which the MLP must keep anyway) and recomputes s in the
backward; the torch reference also keeps silu(g), an extra (N, I) activation per layer.

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


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as in transformers' ``LlamaMLP``. gate, up: (..., I)."""
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """Triton SwiGLU. forward(gate (..., I), up (..., I)) -> (..., I)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from ._triton_swiglu import swiglu_fwd

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ._triton_swiglu import swiglu_bwd

        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate, up (..., I) of one shape and dtype (``backend``:
    ``auto|triton|torch``)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    if resolve_backend(backend, gate.device, "swiglu") == "triton":
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


class SwiGLUMLP(nn.Module):
    """Llama/Mistral/Qwen2 MLP ``down(silu(gate(x)) * up(x))`` with the gate fused in one kernel.

    Takes over the original MLP's projection modules (plain Linear, bnb ``Linear4bit`` or
    ``LoRALinear`` alike: they are only called), so parameter names are unchanged.
    ``chunk_tokens > 0`` tiles the sequence dimension (see the module docstring); 0 = off."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 backend: str = "auto", chunk_tokens: int = 0, group_projections: bool = False) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"SwiGLUMLP: chunk_tokens must be >= 0 (got {chunk_tokens})")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend = backend
        self.chunk_tokens = chunk_tokens
        self.group_projections = group_projections  # gate/up as one grouped matmul (grouped_linear.py)
        if chunk_tokens and isinstance(getattr(down_proj, "recompute_skips_base", None), bool):
            down_proj.recompute_skips_base = True  # each chunk's recompute stops before down_proj's base matmul

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H) through (..., I) gate/up activations, untiled."""
        gate_up = None
        if self.group_projections:
            gate_up = grouped_projections(x, self, "gate_up", (self.gate_proj, self.up_proj))
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(swiglu(gate, up, self.backend))

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
        return (f"backend={self.backend}" + (f", chunk_tokens={self.chunk_tokens}" if self.chunk_tokens else "")
                + (", grouped" if self.group_projections else ""))
