"""RMSNorm: reference, autograd Function over the Triton kernel, and module, in two weightings.

Llama (default):
    y = w * cast_to_input_dtype(x_f32 * rstd),   rstd = (mean(x_f32^2) + eps)^(-1/2)
computed in fp32 whatever the input dtype; the output dtype is ``promote(x.dtype, w.dtype)``, as
in transformers' ``LlamaRMSNorm`` / ``MistralRMSNorm`` / ``Qwen2RMSNorm`` / ``Phi3RMSNorm``.

fp32 weight (``weight_fp32=True``, with ``offset`` c; Liger's ``casting_mode="gemma"``):
    y = cast_to_input_dtype((x_f32 * rstd) * (c + w_f32))
the weight applied in fp32 before the only cast, output in x's dtype: ``Gemma2RMSNorm`` /
``Gemma3RMSNorm`` (c = 1: the stored weight is a zero-centred offset) and ``Olmo2RMSNorm`` (c = 0).
The backward below holds with w replaced by c + w (a constant shift: dw is unchanged) and n
not rounded to the input dtype.

Backward (per row, H = hidden size, n = x * rstd, dn = dy * w; the cast is treated as identity):
    d rstd / d x_j = -rstd^3 * x_j / H
    dx_j = rstd * dn_j + sum_i dn_i * x_i * (d rstd / d x_j)
         = rstd * (dn_j - n_j * (1/H) * sum_i dn_i * n_i)
    dw   = sum over rows of dy * n
The Triton path saves x and rstd (fp32, one float per row) — not the normalised activations.

Fused residual add (:func:`add_rms_norm`, ``RMSNorm(x, residual)``): s = x + r, y = rmsnorm(s) * w,
returning (y, s); s is the new residual stream. s reaches the loss through y and through its own
later use (the next residual add), so with ds_out = dL/ds from that later use:
    dL/ds = ds_out + (d y / d s)^T dy = ds_out + rstd * (dn - n * (1/H) * sum_i dn_i * n_i)
(the RMSNorm dx above, with s in place of x), and since d s / d x = d s / d r = I:
    dx = dr = dL/ds,   dw = sum over rows of dy * n   (n = s * rstd)
One kernel computes dL/ds including the ds_out term, so the separate gradient add of the
unfused graph disappears. Saved: s and rstd (as for RMSNorm of s), never x and r.
Without a residual (``add_rms_norm(x, None, ...)``) s is x itself, passed through: the same
backward sums the gradient of x's other use (the residual branch of a decoder layer's input) into
the norm's dx, again without a separate add.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import resolve_backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
                       weight_fp32: bool = False) -> torch.Tensor:
    """Pure-torch RMSNorm, identical to transformers' ``LlamaRMSNorm.forward`` (``weight_fp32`` with
    ``offset`` 1: ``Gemma2RMSNorm`` / ``Gemma3RMSNorm``; with 0: ``Olmo2RMSNorm``).

    x: (..., H); weight: (H,). Returns (..., H) in ``promote(x.dtype, weight.dtype)`` (x's dtype
    with ``weight_fp32``)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_fp32:
        w = weight.float() + offset if offset else weight.float()
        return (xf * w).to(x.dtype)
    return weight * xf.to(x.dtype)


def _check_mode(offset: float, weight_fp32: bool) -> None:
    if offset and not weight_fp32:
        raise ValueError("rms_norm: a weight offset is only supported with weight_fp32=True (Gemma's weighting)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with unit stride on H (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm. forward(x (..., H), weight (H,), eps, offset, weight_fp32) -> (..., H)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                weight_fp32: bool = False) -> torch.Tensor:
        from ._triton_rmsnorm import rmsnorm_fwd

        x2 = _rows(x)
        y, rstd = rmsnorm_fwd(x2, weight.contiguous(), eps, offset, weight_fp32)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.mode = (offset, weight_fp32)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ._triton_rmsnorm import rmsnorm_bwd

        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        dx, dw = rmsnorm_bwd(dy2, x2, weight.contiguous(), rstd, ctx.needs_input_grad[1], *ctx.mode)
        return dx.view(dy.shape), dw, None, None, None


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float, *, offset: float = 0.0,
                           weight_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch: s = x + residual (x itself when residual is None), then :func:`rms_norm_reference`
    of s (the transformers decoder layer's ``residual + hidden_states`` then ``post_attention_layernorm``).

    x, residual: (..., H); weight: (H,). Returns (y (..., H), s (..., H))."""
    s = x if residual is None else x + residual
    return rms_norm_reference(s, weight, eps, offset=offset, weight_fp32=weight_fp32), s


class AddRMSNormFunction(torch.autograd.Function):
    """Triton residual add + RMSNorm. forward(x (..., H), residual (..., H), weight (H,), eps, offset,
    weight_fp32) -> (y (..., H), s (..., H)); backward per the module docstring (saves s and rstd only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float, offset: float = 0.0, weight_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from ._triton_rmsnorm import add_rmsnorm_fwd, rmsnorm_fwd

        if residual is None:  # s = x, passed through (autograd returns it as an alias of x)
            y, rstd = rmsnorm_fwd(_rows(x), weight.contiguous(), eps, offset, weight_fp32)
            s = x
        elif x.shape != residual.shape:
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
        else:
            y, s, rstd = add_rmsnorm_fwd(_rows(x), _rows(residual), weight.contiguous(), eps, offset, weight_fp32)
            s = s.view(x.shape)
        y = y.view(x.shape)
        ctx.save_for_backward(s, weight, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.mode = (offset, weight_fp32)
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, ds_out: torch.Tensor | None):
        from ._triton_rmsnorm import add_rmsnorm_bwd, rmsnorm_bwd

        s, weight, rstd = ctx.saved_tensors
        dw = None
        if dy is None:  # y unused: s's gradient is its later use's alone
            ds = ds_out
        else:
            s2, dy2, w = _rows(s), _rows(dy), weight.contiguous()
            need_dw = ctx.needs_input_grad[2]
            if ds_out is None:
                ds, dw = rmsnorm_bwd(dy2, s2, w, rstd, need_dw, *ctx.mode)
            else:
                ds, dw = add_rmsnorm_bwd(dy2, _rows(ds_out), s2, w, rstd, need_dw, *ctx.mode)
            ds = ds.view(s.shape)
        if ds is None:
            return None, None, dw, None, None, None
        dx_dtype, dr_dtype = ctx.dtypes
        return ds.to(dx_dtype), None if dr_dtype is None else ds.to(dr_dtype), dw, None, None, None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 backend: str = "auto", *, offset: float = 0.0,
                 weight_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(s) * weight, s) with s = x + residual (x itself when residual is None: use the
    returned s, not x, for x's other uses, so that their gradient is summed in the norm's backward)
    for x, residual (..., H), weight (H,), through the fused Triton kernel or
    :func:`add_rms_norm_reference` (``backend``: ``auto|triton|torch``; ``offset`` / ``weight_fp32``:
    the weighting, see the module docstring)."""
    _check_mode(offset, weight_fp32)
    if resolve_backend(backend, x.device, "rmsnorm") == "triton":
        return AddRMSNormFunction.apply(x, residual, weight, eps, offset, weight_fp32)
    return add_rms_norm_reference(x, residual, weight, eps, offset=offset, weight_fp32=weight_fp32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto", *,
             offset: float = 0.0, weight_fp32: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,) through the Triton kernel or the torch reference
    (``backend``: ``auto|triton|torch``, resolved by :func:`dispatch.resolve_backend`; ``offset`` /
    ``weight_fp32``: the weighting, see the module docstring)."""
    _check_mode(offset, weight_fp32)
    if resolve_backend(backend, x.device, "rmsnorm") == "triton":
        return RMSNormFunction.apply(x, weight, eps, offset, weight_fp32)
    return rms_norm_reference(x, weight, eps, offset=offset, weight_fp32=weight_fp32)


class RMSNorm(nn.Module):
    """Drop-in replacement for ``LlamaRMSNorm`` (same ``weight`` / ``variance_epsilon`` names, so
    state dicts are unchanged); with ``offset=1.0, weight_fp32=True`` for ``Gemma2RMSNorm`` /
    ``Gemma3RMSNorm`` and ``weight_fp32=True`` for ``Olmo2RMSNorm``. Build from an existing module
    with :meth:`from_module`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "auto", *, offset: float = 0.0,
                 weight_fp32: bool = False) -> None:
        super().__init__()
        _check_mode(offset, weight_fp32)
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset == 1.0 else torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.backend = backend
        self.offset, self.weight_fp32 = float(offset), weight_fp32

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto", *, offset: float = 0.0,
                    weight_fp32: bool = False) -> "RMSNorm":
        """Take over ``module.weight`` (the same Parameter object) and its epsilon; ``offset`` /
        ``weight_fp32`` say the module's weighting (the module docstring)."""
        _check_mode(offset, weight_fp32)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = module.weight
        new.variance_epsilon = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        new.backend = backend
        new.offset, new.weight_fp32 = float(offset), weight_fp32
        return new

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, *,
                return_residual: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(..., H) -> (..., H). With ``residual`` (..., H): the fused residual add, returning
        (norm(s) (..., H), s (..., H)), s = hidden_states + residual; ``return_residual`` without
        a residual: s is hidden_states passed through (see :func:`add_rms_norm`)."""
        mode = {"offset": self.offset, "weight_fp32": self.weight_fp32}
        if residual is not None or return_residual:
            return add_rms_norm(hidden_states, residual, self.weight, self.variance_epsilon, self.backend, **mode)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.backend, **mode)

    def extra_repr(self) -> str:
        mode = (f", offset={self.offset:g}" if self.offset else "") + (", weight_fp32" if self.weight_fp32 else "")
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{mode}, backend={self.backend}"
