"""Permanent merge for deployment: every ``LoRALinear`` becomes a plain 16-bit ``nn.Linear`` holding
W' (``W + s B A``, or DoRA's ``m / ||W + s B A||_row * (W + s B A)``), computed in fp32 from the
dequantized NF4 weight; any remaining 4-bit layer is dequantized too, and the model's quantization
config is dropped so ``save_pretrained`` writes an ordinary checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.lora.modules import replace_module
from qlora_trainer.lora.experts import merge_experts
from qlora_trainer.lora.router import merge_routers
from qlora_trainer.lora.layer import LoRALinear, dequantized_weight, frozen_linear
from qlora_trainer.models.quantize import is_4bit
from qlora_trainer.lora.tokens import merge_token_rows
from qlora_trainer.runtime import resolve_dtype


def dequantize_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` in ``dtype`` with the (dequantized) weight and bias of ``module``."""
    return frozen_linear(module, dequantized_weight(module), dtype)


@torch.no_grad()
def merge_lora(model: nn.Module, *, adapter_name: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge adapter ``adapter_name`` (default: each layer's active one) into dense weights, in place.

    ``dtype`` defaults to the runtime's compute dtype for the model's device (bf16 on CUDA, fp32 on
    the CPU). Layers without that adapter keep their base weight. Returns ``model``.
    """
    if dtype is None:
        device = next(model.parameters()).device
        dtype = resolve_dtype("auto", device)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            use = adapter_name if adapter_name in layer.specs else (None if adapter_name else layer.active_adapter)
            replace_module(model, name, layer.dense_linear(use, dtype=dtype))

    merge_experts(model, adapter_name, dtype)  # fused MoE experts (lora/experts.py) into 16-bit experts
    merge_routers(model, adapter_name, dtype)  # MoE routers (lora/router.py): W + s B A under transformers' key

    merge_token_rows(model)  # rows of added tokens (data.marker_tokens=add) into the embedding / output tables
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            replace_module(model, name, dequantize_linear(module, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    model.to(dtype)  # embeddings, norms, lm_head: one 16-bit dtype throughout
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return model
