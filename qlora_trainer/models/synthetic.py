"""Full-size models with random weights built directly in NF4, layer by layer from the meta device.

The transformers model is created on ``meta`` (no storage); each decoder ``nn.Linear`` is then
materialised alone on ``device`` in ``compute_dtype``, filled with N(0, 0.02), quantized with
:func:`qlora_trainer.models.quantize.quantize_linear` and its 16-bit copy dropped, so at most one
16-bit linear exists at a time and a 70B model never exists in 16 bits. Embeddings, norms and
``lm_head`` are materialised in ``compute_dtype`` (they stay 16-bit in QLoRA). Used by
``memory --measure`` and the benchmarks to train on shapes no one has downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.models.catalog import ArchSpec, get_arch
from qlora_trainer.models.quantize import quantize_linear

INIT_STD = 0.02


def synthetic_nf4_model(
    arch: ArchSpec | str,
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A frozen ``*ForCausalLM`` of shape ``arch`` whose decoder linears are bnb NF4 ``Linear4bit``."""
    from transformers import AutoModelForCausalLM

    arch = get_arch(arch) if isinstance(arch, str) else arch
    device = torch.device(device)
    cfg = arch.to_hf_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=compute_dtype, attn_implementation=attn_implementation)
    gen = torch.Generator(device=device).manual_seed(seed)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and not full.endswith("lm_head"):
                setattr(parent, name, _nf4_linear(child, device, compute_dtype, gen, double_quant, quant_storage))
            elif name == "rotary_emb":  # non-persistent buffers: rebuild on the device
                with torch.device(device):
                    setattr(parent, name, type(child)(config=model.config))
    _materialize_rest(model, device, compute_dtype, gen)
    if arch.tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.requires_grad_(False)
    return model


def _nf4_linear(meta: nn.Linear, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                double_quant: bool, quant_storage: torch.dtype) -> nn.Module:
    """One 16-bit (out, in) weight on ``device``, quantized, then released."""
    lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0.0, INIT_STD, generator=gen)
        if lin.bias is not None:
            lin.bias.zero_()
    q = quantize_linear(lin, compute_dtype=dtype, double_quant=double_quant, quant_storage=quant_storage,
                        device=device)
    del lin
    return q


def _materialize_rest(model: nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Give every parameter still on ``meta`` real storage: norm weights 1, others N(0, 0.02)."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            data = torch.empty(p.shape, dtype=dtype, device=device)
            if "norm" in type(module).__name__.lower():
                data.fill_(1.0)
            else:
                data.normal_(0.0, INIT_STD, generator=gen)
            module._parameters[pname] = nn.Parameter(data, requires_grad=False)
        for bname, b in module._buffers.items():
            if b is not None and b.is_meta:
                raise RuntimeError(f"synthetic_nf4_model: buffer {bname!r} of {type(module).__name__} "
                                   "is still on meta; add a rebuild rule for it")
