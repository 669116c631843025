"""Routing of a frozen (+ LoRA) linear layer to our kernels: :func:`lora_matmul`, :func:`frozen_matmul`.

The backend choice itself (``auto|triton|torch``) is ``backend.py`` (re-exported here); the frozen
weight is ``base_weight.py``'s cached :class:`~qlora_trainer.kernels.base_weight.BaseWeight`.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import resolve_backend, sm_count
from .base_weight import base_weight
from .lora_linear import frozen_linear, lora_linear, lora_update

__all__ = ["resolve_backend", "sm_count", "lora_matmul", "frozen_matmul"]


def lora_matmul(
    x: torch.Tensor,
    base: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    backend: str = "auto",
    recompute_skips_base: bool = False,
) -> torch.Tensor:
    """y = base(x) + scale * (dropout(x) @ A^T) @ B^T.

    Args:
        x: (..., in_features) input.
        base: frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (weight (out, in), optional bias).
        lora_A: (r, in_features). lora_B: (out_features, r).
        scale: alpha / r (or alpha / sqrt(r)).
        dropout: probability p of zeroing an adapter input element, applied whenever p > 0
            (callers pass 0 in eval mode).
        backend: ``auto|triton|torch`` (see :func:`resolve_backend`).
        recompute_skips_base: adapter term first, base matmul after, so that a checkpoint recompute stops
            before the base matmul (for a layer whose output the backward never needs, e.g.
            down_proj; see ``lora_linear.lora_linear``). Ignored on the fallback path.
    Returns:
        (..., out_features) in ``x.dtype``.

    A frozen NF4 ``Linear4bit`` or dense ``nn.Linear`` base goes through
    ``lora_linear.LoRALinearFunction`` on either backend (W recomputed in the backward, our NF4
    dequantization: Triton, or the torch reference; never bitsandbytes' CPU-feature-dependent
    kernels); other bases (trainable, FP4, unknown modules) take the plain path below, where
    dropout is ``F.dropout`` (device RNG, its mask kept for backward by autograd); the Function
    instead regenerates its mask in the backward from an 8-byte device seed (``dropout.py``).
    """
    bw = base_weight(base, resolve_backend(backend, x.device))
    if bw is not None:
        return lora_linear(x, bw, lora_A, lora_B, scale, dropout, recompute_skips_base=recompute_skips_base)
    xa = torch.nn.functional.dropout(x, dropout, training=True) if dropout > 0 else x
    y = base(x)
    return y + lora_update(xa, lora_A, lora_B, scale, y.dtype)


def frozen_matmul(x: torch.Tensor, base: nn.Module, backend: str = "auto") -> torch.Tensor | None:
    """y = base(x) = x @ W^T (+ bias) for a frozen NF4 ``Linear4bit`` or dense ``nn.Linear``, through
    our dequantization (see :func:`lora_matmul`); None for a base the kernels do not read.

    x: (..., in) -> (..., out) in ``x.dtype``."""
    bw = base_weight(base, resolve_backend(backend, x.device))
    return None if bw is None else frozen_linear(x, bw)
