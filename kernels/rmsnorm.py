"""RMSNorm (Llama semantics): reference, autograd Function over the Triton kernel, and module.

    y = w * cast_to_input_dtype(x_f32 * rstd),   rstd = (mean(x_f32^2) + eps)^(-1/2)

computed in fp32 whatever the input dtype; the output dtype is ``promote(x.dtype, w.dtype)``, as
in transformers' ``LlamaRMSNorm`` / ``MistralRMSNorm`` / ``Qwen2RMSNorm``.

Backward (per row, H = hidden size, n = x * rstd, dn = dy * w; the cast is treated as identity):
    d rstd / d x_j = -rstd^3 * x_j / H
    dx_j = rstd * dn_j + sum_i dn_i * x_i * (d rstd / d x_j)
         = rstd * (dn_j - n_j * (1/H) * sum_i dn_i * n_i)
    dw   = sum over rows of dy * n
The Triton path saves x and rstd (fp32, one float per row) — not the normalised activations.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import resolve_backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch RMSNorm, identical to transformers' ``LlamaRMSNorm.forward``.

    x: (..., H); weight: (H,). Returns (..., H) in ``promote(x.dtype, weight.dtype)``."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm. forward(x (..., H), weight (H,), eps) -> (..., H)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from ._triton_rmsnorm import rmsnorm_fwd

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = rmsnorm_fwd(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ._triton_rmsnorm import rmsnorm_bwd

        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = rmsnorm_bwd(dy2, x2, weight.contiguous(), rstd, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,) through the Triton kernel or the torch reference
    (``backend``: ``auto|triton|torch``, resolved by :func:`dispatch.resolve_backend`)."""
    if resolve_backend(backend, x.device) == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """Drop-in replacement for ``LlamaRMSNorm`` (same ``weight`` / ``variance_epsilon`` names, so
    state dicts are unchanged). Build from an existing module with :meth:`from_module`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "RMSNorm":
        """Take over ``module.weight`` (the same Parameter object) and its epsilon."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = module.weight
        new.variance_epsilon = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        new.backend = backend
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)."""
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend}"
