"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") on a frozen 16-bit or NF4 base.

The adapted weight is split into a trainable magnitude m (out,) and a direction::

    W' = m ⊙ (W + s B A) / n,      n = ||W + s B A||_row   (out,)

The norm runs over the input axis of each output row (``dim=1`` of the (out, in) weight), the axis
PEFT's ``DoraLinearLayer.get_weight_norm`` uses for ``nn.Linear``; m starts at ||W||_row so the layer
equals the base at init (B = 0). As in section 4.3 of the paper (and PEFT), n is treated as a
constant in backward (computed under ``no_grad``): only m, A and B receive gradients, and no
(out, in) activation of W + s B A is saved for backward.

Forward without the dense W' (x (..., in), g = m / n (out,), b the base bias)::

    y = g ⊙ (W x + s B A x) + b
      = g ⊙ (lora_matmul(x) - b) + b                                   (no dropout)
    y = base(x) + (g - 1) ⊙ W x_d + g ⊙ s B A x_d,   x_d = dropout(x)  (PEFT's training form)
      = base(x - x_d) + g ⊙ (lora_matmul(x_d) - b)                     (one base matmul each)

Gradients (autograd, n constant): dL/dm_o = Σ_t dL/dy_to · (W x_d + s B A x_d)_to / n_o, and A, B
get the plain LoRA gradients scaled per output row by g. n needs the dense W once per forward: it is
dequantized from NF4 transiently (one layer at a time, freed right after), never stored in 16 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.kernels import lora_matmul
from qlora_trainer.lora.base import dequantized_weight

_ROW_CHUNK = 4096  # rows of W + s B A materialised in fp32 at a time for the norm


@torch.no_grad()
def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """n = ||W + s B A|| over the input axis, in fp32, without gradient.

    weight (out, in), lora_A (r, in), lora_B (out, r) -> (out,) float32.
    """
    a = lora_A.detach().float()
    b = lora_B.detach().float()
    out = torch.empty(weight.shape[0], device=weight.device, dtype=torch.float32)
    for i in range(0, weight.shape[0], _ROW_CHUNK):
        rows = weight[i:i + _ROW_CHUNK].float() + scale * (b[i:i + _ROW_CHUNK] @ a)
        out[i:i + _ROW_CHUNK] = torch.linalg.vector_norm(rows, dim=1)
    return out


def dora_forward(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    base: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA layer output (see the module docstring).

    Args:
        x: (..., in). x_lora: dropout(x) (same shape) in training with dropout, else ``None``.
        base: frozen ``nn.Linear`` / ``Linear4bit``. lora_A (r, in), lora_B (out, r), magnitude (out,).
        norm: a precomputed :func:`weight_norm` (out,) (the layer caches it in eval mode), else computed.
    Returns:
        (..., out) in the base output dtype.
    """
    n = weight_norm(dequantized_weight(base, backend), lora_A, lora_B, scale) if norm is None else norm  # (out,), constant
    bias = base.bias
    if x_lora is None:
        u = lora_matmul(x, base, lora_A, lora_B, scale, backend=backend)  # W x + s B A x + b
        rest = None
    else:
        u = lora_matmul(x_lora, base, lora_A, lora_B, scale, backend=backend)  # W x_d + s B A x_d + b
        rest = base(x - x_lora)  # W (x - x_d) + b
    g = (magnitude.float() / n).to(u.dtype)  # (out,)
    if bias is not None:
        u = u - bias.to(u.dtype)
    y = g * u
    if rest is not None:
        return y + rest
    return y + bias.to(u.dtype) if bias is not None else y
