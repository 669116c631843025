"""Module replacement of ``nn.Linear`` by bitsandbytes NF4 ``Linear4bit`` (no patching).

Used for models built in-process (``random:<arch>``, synthetic full-size models, tests). Models
loaded from disk or the hub go through transformers' ``BitsAndBytesConfig`` instead, which produces
the same ``Linear4bit`` modules.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.models.nf4_linear import claim_4bit_layers
from qlora_trainer.models.moe import quantize_experts


def quantize_linear(
    linear: nn.Linear,
    *,
    compute_dtype: torch.dtype,
    double_quant: bool = True,
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int = 64,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Return a frozen ``bnb.nn.Linear4bit`` holding ``linear``'s weight in 4 bits, claimed by
    :func:`~qlora_trainer.models.nf4_linear.claim_4bit_layers` (NF4 computes through our kernels).

    The weight (out, in) is quantized when the module moves to ``device`` (default: the weight's
    device; a meta weight is an error). The bias, if any, is kept in ``compute_dtype``.
    """
    import bitsandbytes as bnb

    if linear.weight.is_meta:
        raise ValueError("quantize_linear: weight is on the meta device; materialize it first")
    device = torch.device(device) if device is not None else linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=quant_storage, device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu" if device.type == "meta" else linear.weight.device),
        requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=quant_storage, blocksize=blocksize,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    q = q.to(device)
    claim_4bit_layers(q)
    return q


def quantize_model(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype,
    skip: tuple[str, ...] = ("lm_head",),
    **kwargs,
) -> nn.Module:
    """Replace every ``nn.Linear`` whose name does not end in ``skip`` by NF4 ``Linear4bit``, in place.

    Fused mixture-of-experts weights (3-D, not ``nn.Linear``) become ``models.moe.NF4Experts``.
    Embeddings, norms and ``lm_head`` stay 16-bit as in QLoRA. Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not full.endswith(skip):
                setattr(module, child_name, quantize_linear(child, compute_dtype=compute_dtype, **kwargs))
    if kwargs.get("quant_type", "nf4") == "nf4":
        quantize_experts(model, compute_dtype=compute_dtype, double_quant=kwargs.get("double_quant", True),
                         blocksize=kwargs.get("blocksize", 64),
                         quant_storage=kwargs.get("quant_storage", torch.uint8), device=kwargs.get("device"))
    return model


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4", "NF4Linear")
