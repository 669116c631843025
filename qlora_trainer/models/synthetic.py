"""Full-size models with random weights built directly in NF4, layer by layer from the meta device.

Every tensor is a function of (seed, state-dict name, generator device) only (:func:`tensor_for`):
N(0, 0.02) rounded to bf16 for matrices and embeddings (transformers' ``initializer_range``), ones
for norms, zeros for biases, so it does not depend on build order, and ``benchmarks.weights`` can
write the very same tensors as a bf16 checkpoint.

The transformers model is created on ``meta`` (no storage); each decoder ``nn.Linear`` is then
materialised alone on ``device`` in ``compute_dtype``, quantized with
:func:`qlora_trainer.models.quantize.quantize_linear` and its 16-bit copy dropped, so at most one
16-bit linear exists at a time and a 70B model never exists in 16 bits. Embeddings, norms and
``lm_head`` are materialised in ``compute_dtype`` (they stay 16-bit in QLoRA). Used by
``memory --measure`` and the benchmarks to train on shapes no one has downloaded.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from qlora_trainer.models.catalog import ArchSpec, get_arch
from qlora_trainer.models.quantize import quantize_linear

INIT_STD = 0.02


def generator_device() -> torch.device:
    """Tensors are generated on CUDA when present (fast for 70B), else on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_for(name: str, shape: tuple[int, ...], *, seed: int, device: torch.device) -> torch.Tensor:
    """The bf16 tensor of shape ``shape`` called ``name`` (a state-dict key) for ``seed``, on ``device``.

    ``*norm.weight``: ones; ``*.bias``: zeros; anything else N(0, INIT_STD) drawn in fp32 from a
    generator seeded by (seed, crc32(name)) on ``device``, then rounded to bf16.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
    w = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, INIT_STD, generator=g)
    return w.to(torch.bfloat16)


def meta_skeleton(cfg, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """``AutoModelForCausalLM`` of transformers config ``cfg``, every parameter and buffer on ``meta``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)


def synthetic_nf4_model(
    arch: ArchSpec | str,
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    gen_device: torch.device | str | None = None,
):
    """A frozen ``*ForCausalLM`` of shape ``arch`` whose decoder linears are bnb NF4 ``Linear4bit``.

    Tensors are :func:`tensor_for` (``seed``, name) drawn on ``gen_device`` (default
    :func:`generator_device`), then cast to ``compute_dtype`` on ``device``. Peak memory: the NF4
    model plus one 16-bit linear.
    """
    arch = get_arch(arch) if isinstance(arch, str) else arch
    device = torch.device(device)
    gen_dev = torch.device(gen_device) if gen_device is not None else generator_device()
    model = meta_skeleton(arch.to_hf_config(), compute_dtype, attn_implementation)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and full != "lm_head":
                w = tensor_for(f"{full}.weight", tuple(child.weight.shape), seed=seed, device=gen_dev)
                w = w.to(device, compute_dtype)
                setattr(parent, name, _nf4_linear(child, w, double_quant, quant_storage))
                del w
            elif name == "rotary_emb":  # non-persistent buffers: rebuild on the device
                with torch.device(device):
                    setattr(parent, name, type(child)(config=model.config))
    _materialize_rest(model, device, compute_dtype, seed, gen_dev)
    if arch.tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.requires_grad_(False)
    return model


def _nf4_linear(meta: nn.Linear, weight: torch.Tensor, double_quant: bool, quant_storage: torch.dtype) -> nn.Module:
    """``meta``'s shape with ``weight`` (out, in) and a zero bias, quantized; the 16-bit copy is released."""
    lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(torch.zeros(meta.out_features, device=weight.device, dtype=weight.dtype),
                                requires_grad=False)
    q = quantize_linear(lin, compute_dtype=weight.dtype, double_quant=double_quant, quant_storage=quant_storage,
                        device=weight.device)
    del lin, weight
    return q


def _materialize_rest(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int,
                      gen_dev: torch.device) -> None:
    """Give every parameter still on ``meta`` its :func:`tensor_for` value (a tied ``lm_head`` is skipped:
    ``named_parameters`` lists the shared tensor once, under the embedding's name)."""
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            owner, _, leaf = name.rpartition(".")
            value = tensor_for(name, tuple(p.shape), seed=seed, device=gen_dev).to(device, dtype)
            model.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"synthetic_nf4_model: buffer {name!r} is still on meta; add a rebuild rule for it")
