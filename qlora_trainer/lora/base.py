"""The frozen base layer under an adapter, as the lora package sees it: its dense weight, its
compute dtype, and a frozen ``nn.Linear`` built from a weight (merge).

"Give me W" has one implementation: ``qlora_trainer.kernels.base_weight`` (cached on the module,
our NF4 dequantization); only FP4 layers, which our kernels do not read, go through bitsandbytes.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.kernels.backend import resolve_backend
from qlora_trainer.kernels.base_weight import base_weight, quant_state_of
from qlora_trainer.models.nf4_linear import claim_4bit_layers


def base_weight_of(base: nn.Module, backend: str = "auto"):
    """The cached ``kernels.base_weight.BaseWeight`` of a frozen ``base`` (None if the kernels do not
    read it: FP4, trainable, other modules). Undoes bitsandbytes' AVX512 repacking first."""
    quant_state = quant_state_of(base)
    if getattr(quant_state, "packing_format_for_cpu", False):
        claim_4bit_layers(base)  # undo bitsandbytes' AVX512 repacking (warns: lossy)
    return base_weight(base, resolve_backend(backend, base.weight.device))


def dequantized_weight(base: nn.Module, backend: str = "auto") -> torch.Tensor:
    """The base layer's weight (out, in) as a dense tensor (a transient copy for a 4-bit layer).

    NF4 and frozen dense layers through :func:`base_weight_of` (Triton on CUDA, the torch reference
    elsewhere; ``backend`` is ``auto|triton|torch``), never bitsandbytes' CPU kernels; FP4 through
    bitsandbytes; a trainable weight detached."""
    bw = base_weight_of(base, backend)
    if bw is not None:
        return bw.weight().detach()
    w = base.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is None:
        return w.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, quant_state)


def frozen_linear(like: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` in ``dtype`` with ``weight`` (out, in) and ``like``'s bias (if any)."""
    bias = like.bias
    lin = nn.Linear(like.in_features, like.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


def base_compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in (``Linear4bit.compute_dtype`` or the weight's dtype)."""
    dtype = getattr(base, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    qs = getattr(base.weight, "quant_state", None)
    return qs.dtype if qs is not None else base.weight.dtype
