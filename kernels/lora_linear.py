"""LoRA linear over a frozen (NF4 or dense 16-bit) base weight, with a memory-lean backward.

    y = x @ W^T (+ bias) + s * (x_l @ A^T) @ B^T        x: (M, in), W: (out, in) frozen,
    x_l = x ⊙ k / (1 - p)   (dropout; x_l = x when p = 0)      A: (r, in), B: (out, r)

k (M, in) is the keep-mask, k_ij ~ Bernoulli(1 - p), drawn from a generator seeded with an integer
drawn in the forward (:func:`draw_seed`, from torch's CPU default generator, so checkpoint
recomputes and exact resume redraw the same seed) by :func:`dropout_mask`.

Backward, with dy = dL/dy (M, out) and u = x_l @ A^T (M, r) saved from the forward:
    dL/dB  = s * dy^T @ u                          (out, r)
    du     = s * dy @ B                            (M, r)
    dL/dA  = du^T @ x_l                            (r, in)
    dL/dx  = dy @ W + (du @ A) ⊙ k / (1 - p)       (M, in)   (k = 1 when p = 0)
The dropout branch of dL/dx is the chain rule through x_l = x ⊙ k / (1 - p), whose Jacobian is
diagonal. W and bias are frozen: no dW, and W is *recomputed* (dequantized again) in the backward
instead of being saved; neither x_l nor k is saved either: k is regenerated from the seed (a
transient (M, in) tensor) and x_l = x ⊙ k / (1 - p) rebuilt. The saved activations are x (M, in)
— usually shared with the other adapters reading the same input — and u (M, r), the same bytes
with dropout as without. The LoRA math runs in the activation dtype; dA/dB are returned in A/B's
dtype.

Base matmul: for an NF4 weight with few tokens (M <= ``FUSED_MAX_TOKENS``) a Triton GEMM that
dequantizes inside the operand load (``_triton_lora.py``); otherwise the Triton dequant kernel
(``nf4.py``) to a transient 16-bit W, then cuBLAS. A dense weight goes straight to cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .nf4 import NF4Weight, dequantize_nf4

# Above this many tokens the dequant pass is amortised and cuBLAS on a dequantized W is faster
# than the fused dequant-in-GEMM kernel (to be re-tuned with benchmarks/kernels/bench_nf4_lora.py).
FUSED_MAX_TOKENS = 64


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality
class BaseWeight:
    """The frozen base layer of a LoRA linear: exactly one of ``dense`` (out, in) or ``nf4``; bias
    (out,) or None. ``backend`` (``triton|torch``) picks the NF4 dequant/fused kernels."""

    dense: torch.Tensor | None = None
    nf4: NF4Weight | None = None
    bias: torch.Tensor | None = None
    backend: str = "triton"

    @classmethod
    def from_module(cls, base: nn.Module, backend: str = "triton") -> "BaseWeight | None":
        """From a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (NF4); None if unsupported
        (trainable base, FP4, not yet quantized, other module types) — callers then fall back."""
        weight = getattr(base, "weight", None)
        bias = getattr(base, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.requires_grad:
            return None
        if bias is not None and bias.requires_grad:
            return None
        state = getattr(weight, "quant_state", None)
        if state is not None:
            if state.quant_type != "nf4":
                return None
            if getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError("this NF4 weight was repacked by bitsandbytes' AVX512 CPU inference path "
                                   "(lossy, no autograd); claim the model's 4-bit layers before running it: "
                                   "qlora_trainer.models.nf4_linear.claim_4bit_layers(model)")
            return cls(nf4=NF4Weight.from_bnb(weight.data, state), bias=bias, backend=backend)
        if type(base) is nn.Linear:
            return cls(dense=weight, bias=bias, backend=backend)
        return None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.nf4.shape if self.nf4 is not None else self.dense.shape)  # type: ignore[return-value]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W (out, in) in ``dtype`` (a transient dequantized copy for NF4)."""
        if self.nf4 is not None:
            return dequantize_nf4(self.nf4, dtype, backend=self.backend)
        return self.dense.to(dtype)

    def _fused(self, m: int, fuse: bool | None) -> bool:
        if self.nf4 is None or self.backend != "triton":
            return False
        return m <= FUSED_MAX_TOKENS if fuse is None else fuse

    def forward_matmul(self, x: torch.Tensor, fuse: bool | None) -> torch.Tensor:
        """x (M, in) -> x @ W^T + bias (M, out), in x.dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._fused(x.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(x, self.nf4, trans_w=True, bias=bias)
        w = self.weight(x.dtype)
        return torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()

    def backward_matmul(self, dy: torch.Tensor, fuse: bool | None) -> torch.Tensor:
        """dy (M, out) -> dy @ W (M, in), in dy.dtype (W recomputed, never saved)."""
        if self._fused(dy.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(dy, self.nf4, trans_w=False)
        return dy @ self.weight(dy.dtype)


def draw_seed() -> int:
    """A dropout seed from torch's CPU default generator (what ``torch.manual_seed`` sets and
    ``torch.utils.checkpoint`` / ``fork_rng`` save and restore, whatever device the tensors are on)."""
    return int(torch.randint(2**62, ()))


def dropout_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask k (``shape``, 1 with probability 1 - p, else 0) in ``dtype`` on ``device``:
    a function of (seed, shape, p, device, dtype) only, so the backward regenerates the forward's."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _dropped_(mask: torch.Tensor, x2: torch.Tensor, p: float) -> torch.Tensor:
    """x_l = x ⊙ k / (1 - p) (M, in), written over the mask k (one rounding to x's dtype)."""
    return mask.mul_(x2).mul_(1.0 / (1.0 - p))


class LoRALinearFunction(torch.autograd.Function):
    """forward(x (..., in), A (r, in), B (out, r), base, scale, dropout, fuse) -> (..., out).

    ``dropout`` is the probability p of zeroing an adapter input (applied whenever p > 0: the
    caller passes 0 in eval mode); the mask is never saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: BaseWeight,
                scale: float, dropout: float, fuse: bool | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        a = lora_A.to(x.dtype)
        b = lora_B.to(x.dtype)
        seed = draw_seed() if dropout > 0 else None
        if seed is None:
            u = x2 @ a.t()  # (M, r)
        else:
            u = _dropped_(dropout_mask(seed, x2.shape, dropout, x2.device, x2.dtype), x2, dropout) @ a.t()
        y = base.forward_matmul(x2, fuse)  # (M, out)
        y.addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x2, u, lora_A, lora_B)
        ctx.base, ctx.scale, ctx.fuse, ctx.p, ctx.seed = base, scale, fuse, dropout, seed
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, u, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype).contiguous()  # (M, out)
        a = lora_A.to(u.dtype)
        b = lora_B.to(u.dtype)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        du = (dy2 @ b) * s  # (M, r)
        mask = None
        if ctx.seed is not None and (need_a or need_x):
            mask = dropout_mask(ctx.seed, x2.shape, p, x2.device, x2.dtype)  # (M, in), transient
        d_a = d_b = dx = None
        if need_b:
            d_b = (dy2.t() @ u).mul_(s).to(lora_B.dtype)  # (out, r)
        if need_x:
            dx = ctx.base.backward_matmul(dy2, ctx.fuse)  # (M, in)
            if mask is None:
                dx.addmm_(du, a)
            else:
                dx.addcmul_(du @ a, mask, value=1.0 / (1.0 - p))
            dx = dx.view(*lead, dx.shape[-1])
        if need_a:  # last: x_l is built over the mask
            xl2 = x2 if mask is None else _dropped_(mask, x2, p)
            d_a = (du.t() @ xl2).to(lora_A.dtype)  # (r, in)
        return dx, d_a, d_b, None, None, None, None


class FrozenLinearFunction(torch.autograd.Function):
    """forward(x (..., in), base) -> x @ W^T + bias (..., out) for a frozen base weight.

    Backward: dL/dx = dy @ W (M, in), with W recomputed (dequantized again) rather than saved, so
    nothing is saved for backward (W and bias are frozen: no dW, no db)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: BaseWeight) -> torch.Tensor:
        lead = x.shape[:-1]
        y = base.forward_matmul(x.reshape(-1, x.shape[-1]).contiguous(), None)  # (M, out)
        ctx.base = base
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        lead = dy.shape[:-1]
        dx = ctx.base.backward_matmul(dy.reshape(-1, dy.shape[-1]).contiguous(), None)  # (M, in)
        return dx.view(*lead, dx.shape[-1]), None


def frozen_linear(x: torch.Tensor, base: BaseWeight) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) via :class:`FrozenLinearFunction` (W never saved)."""
    return FrozenLinearFunction.apply(x, base)


def lora_linear(x: torch.Tensor, base: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, dropout: float = 0.0, *, fuse: bool | None = None) -> torch.Tensor:
    """y (..., out) = x @ W^T (+ bias) + scale * (dropout(x) @ A^T) @ B^T via :class:`LoRALinearFunction`.

    ``dropout``: probability p in [0, 1) of zeroing an adapter input element (0 in eval mode).
    ``fuse``: force (True) / forbid (False) the fused NF4 dequant-in-GEMM kernel; None = by size."""
    return LoRALinearFunction.apply(x, lora_A, lora_B, base, scale, dropout, fuse)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                          x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-autograd oracle: weight (out, in) dense (e.g. a dequantized NF4 weight)."""
    xl = x if x_lora is None else x_lora
    y = torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y + (xl @ lora_A.to(x.dtype).t() @ lora_B.to(x.dtype).t()) * scale
