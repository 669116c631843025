"""SwiGLU gate ``silu(gate) * up``: reference, autograd Function over the Triton kernel, function.

With s = sigmoid(g), silu(g) = g * s and d silu / dg = s + g * s * (1 - s) = s * (1 + g * (1 - s)):
    y  = g * s * u
    dg = dy * u * s * (1 + g * (1 - s))
    du = dy * g * s
The Triton path saves only g and u (which the MLP must keep anyway) and recomputes s in the
backward; the torch reference also keeps silu(g), an extra (N, I) activation per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import resolve_backend


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
    if resolve_backend(backend, gate.device) == "triton":
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


class SwiGLUMLP(nn.Module):
    """Llama/Mistral/Qwen2 MLP ``down(silu(gate(x)) * up(x))`` with the gate fused in one kernel.

    Takes over the original MLP's projection modules (plain Linear, bnb ``Linear4bit`` or
    ``LoRALinear`` alike: they are only called), so parameter names are unchanged."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 backend: str = "auto") -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H) through (..., I) gate/up activations."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.backend))

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
