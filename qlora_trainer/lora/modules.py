"""Module-tree helpers shared by the adapter modules: which layers are linear, which ones a target
spec selects, and module replacement (no patching). A leaf: it imports no other ``lora`` module but
the layer class."""

from __future__ import annotations

import torch
from torch import nn

from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.models.quantize import is_4bit
from qlora_trainer.targets import select_targets


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a bitsandbytes 4-bit linear layer (not our wrapper). An ``nn.Linear`` subclass
    with a forward of its own is not a linear layer: e.g. PhiMoE's router returns (logits, weights,
    experts), which no LoRA update can be added to."""
    if is_4bit(module):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _output_layer_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    return names


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> linear layer (plain or already wrapped), never inside a ``LoRALinear``."""
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear):
            wrapped.append(name)
            found[name] = module
        elif is_linear(module):
            found[name] = module
    return found


def match_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the linear layers ``targets`` selects (see :func:`qlora_trainer.targets.select_targets`)."""
    return select_targets(linear_layers(model), targets, output_names=_output_layer_names(model))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at qualified ``name`` to ``new`` (module replacement, no patching)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrapped(model: nn.Module, name: str, wrapper: type[nn.Module]) -> nn.Module:
    """Module ``name`` wrapped by ``wrapper`` (``wrapper(module)`` put in its place unless it already is one)."""
    module = model.get_submodule(name)
    if not isinstance(module, wrapper):
        module = wrapper(module)
        model.set_submodule(name, module)
    return module


def add_wrapped_adapters(model: nn.Module, names: list[str], wrapper: type[nn.Module], adapter_name: str,
                         spec: AdapterSpec, *, dtype: torch.dtype) -> list[str]:
    """Adapter ``adapter_name`` (``spec``) on each module of ``names``, wrapped by ``wrapper`` first
    where it is not yet; returns ``names``."""
    for name in names:
        wrapped(model, name, wrapper).add_adapter(adapter_name, spec, dtype=dtype)
    return names
