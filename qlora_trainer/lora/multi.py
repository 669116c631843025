"""Several adapters on one (quantized) base: list, switch, disable, merge/unmerge, delete.

Every operation walks the model's ``LoRALinear`` layers; the base weights are never copied or
reloaded. A layer that lacks the requested adapter runs its base alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.layer import LoRALinear


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> ``LoRALinear`` for every adapted layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Adapters present on at least one layer, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter (``None`` when adapters are disabled or there are none)."""
    active = {layer.active_adapter for layer in lora_layers(model).values()} - {None}
    return next(iter(active)) if len(active) == 1 else None


def _check(model: nn.Module, name: str) -> None:
    have = adapter_names(model)
    if name not in have:
        raise QloraError(f"no adapter named {name!r} on the model (loaded: {', '.join(have) or 'none'})")


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter every layer runs (``None``: the base model). Merged layers unmerge."""
    if name is not None:
        _check(model, name)
    for layer in lora_layers(model).values():
        layer.set_adapter(name if name in layer.specs else None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base output; the previous adapter comes back after."""
    layers = lora_layers(model)
    previous = {n: layer.active_adapter for n, layer in layers.items()}
    merged = {n for n, layer in layers.items() if layer.merged_layer is not None}
    for layer in layers.values():
        layer.set_adapter(None)
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.set_adapter(previous[n])
            if n in merged:
                layer.merge(previous[n])


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Run adapter ``name`` (default: the active one) merged into dense weights, reversibly.

    On an NF4 base each layer gets a dense copy of W' (the 4-bit base stays for :func:`unmerge_adapter`);
    for a permanent, saveable merge use ``qlora_trainer.lora.merge.merge_lora``.
    """
    name = active_adapter(model) if name is None else name
    if name is None:
        raise QloraError("merge_adapter: no active adapter; name one")
    set_active_adapter(model, name)
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None:
            layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter` exactly (the original base layers were kept)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (the base and other adapters stay)."""
    _check(model, name)
    for layer in lora_layers(model).values():
        if name in layer.specs:
            layer.delete_adapter(name)
