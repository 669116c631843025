"""The one place that chooses Triton kernels or torch references.

``backend`` is ``"auto"`` (Triton when the tensors are on CUDA and triton imports, else torch),
``"triton"`` or ``"torch"``. Callers (``LoRALinear``) pass the backend they were configured with;
there is no global switch.
"""

from __future__ import annotations

import torch
from torch import nn


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto|triton|torch`` to the backend that will actually run on ``device``."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return "triton"
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def lora_matmul(
    x: torch.Tensor,
    base: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    backend: str = "auto",
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
    Returns:
        (..., out_features) in ``x.dtype``.

    A frozen NF4 ``Linear4bit`` or dense ``nn.Linear`` base goes through
    ``lora_linear.LoRALinearFunction`` on either backend (W recomputed in the backward, our NF4
    dequantization: Triton, or the torch reference; never bitsandbytes' CPU-feature-dependent
    kernels); other bases (trainable, FP4, unknown modules) take the plain path below, where
    dropout is ``F.dropout`` (device RNG, its mask kept for backward by autograd); the Function
    instead regenerates a seeded mask in the backward and saves nothing for it.
    """
    from .lora_linear import BaseWeight, lora_linear

    bw = BaseWeight.from_module(base, backend=resolve_backend(backend, x.device))
    if bw is not None:
        return lora_linear(x, bw, lora_A, lora_B, scale, dropout)
    xa = torch.nn.functional.dropout(x, dropout, training=True) if dropout > 0 else x
    y = base(x)
    return y + (xa.to(lora_A.dtype) @ lora_A.t() @ lora_B.t()).to(y.dtype) * scale


def frozen_matmul(x: torch.Tensor, base: nn.Module, backend: str = "auto") -> torch.Tensor | None:
    """y = base(x) = x @ W^T (+ bias) for a frozen NF4 ``Linear4bit`` or dense ``nn.Linear``, through
    our dequantization (see :func:`lora_matmul`); None for a base the kernels do not read.

    x: (..., in) -> (..., out) in ``x.dtype``."""
    from .lora_linear import BaseWeight, frozen_linear

    bw = BaseWeight.from_module(base, backend=resolve_backend(backend, x.device))
    return None if bw is None else frozen_linear(x, bw)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (grid sizing); 4 under the CPU interpreter,
    so that a few programs still exercise the multi-program paths."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
