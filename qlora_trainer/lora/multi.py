"""Several adapters on one (quantized) base: list, switch, disable, merge/unmerge, delete, and
hot-swap (one slot whose tensors are overwritten in place, see :func:`prepare_hotswap`).

Every operation walks the model's ``LoRALinear`` layers; the base weights are never copied or
reloaded. A layer that lacks the requested adapter runs its base alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.experts import expert_lora_layers
from qlora_trainer.lora.router import router_lora_layers
from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.lora.weights import AdapterWeights
from qlora_trainer.lora.modules import replace_module


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
    for layer in _moe_layers(model).values():
        layer.set_adapter(name)


def _moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted MoE experts (lora/experts.py) and routers (lora/router.py): name -> layer."""
    return {**expert_lora_layers(model), **router_lora_layers(model)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base output; the previous adapter comes back after."""
    layers = {**lora_layers(model), **_moe_layers(model)}
    previous = {n: layer.active_adapter for n, layer in layers.items()}
    merged = {n for n, layer in layers.items() if getattr(layer, "merged_layer", None) is not None}
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
    for layer in _moe_layers(model).values():
        layer.delete_adapter(name)


# -- hot-swapping: one adapter slot, its tensors overwritten in place ------------------------------

def prepare_hotswap(model: nn.Module, adapters: list[AdapterWeights], *, name: str = "hotswap",
                    rank: int | None = None, dtype: torch.dtype = torch.float32, backend: str = "auto") -> int:
    """Add an empty adapter slot ``name`` that any of ``adapters`` can later be swapped into with
    :func:`hotswap_adapter`, and make it active. Returns the slot's rank.

    The slot covers every layer any of them adapts, with one rank R (``rank``, default the largest
    of theirs) and scale 1: an adapter of rank r <= R goes in zero-padded (A[:r], B[:, :r]) with its
    scale folded into B, so swapping changes tensor values only - no module, parameter, shape or
    Python float changes, and a ``torch.compile``d model is not recompiled. The slot is DoRA when
    the adapters are (all or none must be). Layers not yet adapted get a ``LoRALinear``.
    """
    if not adapters:
        raise QloraError("prepare_hotswap: give at least one adapter")
    if any(ad.config.get("target_parameters") for ad in adapters):
        raise QloraError("prepare_hotswap: adapters on fused MoE experts (target_parameters) cannot be hot-swapped; "
                         "load them with load_adapter")
    kinds = {ad.use_dora for ad in adapters}
    if len(kinds) > 1:
        raise QloraError("prepare_hotswap: DoRA and plain LoRA adapters cannot share a slot; prepare one slot each")
    top = max(lw.r for ad in adapters for lw in ad.layers.values())
    rank = top if rank is None else rank
    if rank < top:
        raise QloraError(f"prepare_hotswap: rank {rank} is below the largest adapter rank {top}")
    spec = AdapterSpec(r=rank, alpha=float(rank), use_dora=kinds.pop())
    for layer_name in dict.fromkeys(n for ad in adapters for n in ad.layers):
        try:
            module = model.get_submodule(layer_name)
        except AttributeError:
            raise QloraError(f"prepare_hotswap: adapter module {layer_name!r} is not in the model") from None
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, backend=backend)
            replace_module(model, layer_name, module)
        module.add_adapter(name, spec, dtype=dtype)
        with torch.no_grad():
            module.lora_A[name].zero_()
        module.lora_A[name].requires_grad_(False)
        module.lora_B[name].requires_grad_(False)
    set_active_adapter(model, name)
    return rank


@torch.no_grad()
def hotswap_adapter(model: nn.Module, weights: AdapterWeights, *, name: str = "hotswap") -> None:
    """Overwrite slot ``name`` (from :func:`prepare_hotswap`) with ``weights``, in place, and make it
    active: the model then computes that adapter (rounding aside: the scale is folded into B and the
    rank zero-padded). A slot layer the adapter lacks gets A = B = 0 (base output). Checked first, so
    a refused swap changes nothing."""
    _check(model, name)
    slots = {n: layer for n, layer in lora_layers(model).items() if name in layer.specs}
    extra = sorted(set(weights.layers) - set(slots))
    if extra:
        raise QloraError(f"hotswap: {weights.name} adapts {extra[0]}, which slot {name!r} does not cover; "
                         f"prepare the slot with every adapter to be swapped in")
    for n, layer in slots.items():
        spec, lw = layer.specs[name], weights.layers.get(n)
        if layer.merged_layer is not None:
            raise QloraError(f"hotswap: slot {name!r} is merged on {n}; unmerge_adapter first")
        if spec.use_dora != weights.use_dora or (spec.use_dora and lw is None):
            raise QloraError(f"hotswap: {weights.name} {'is' if weights.use_dora else 'is not'} DoRA, or misses "
                             f"{n}, unlike slot {name!r}; a DoRA slot takes DoRA adapters on all its layers")
        if lw is not None and (lw.r > spec.r or lw.a.shape[1] != layer.in_features
                               or lw.b.shape[0] != layer.out_features):
            raise QloraError(f"hotswap: {weights.name}: {n} has A {tuple(lw.a.shape)}, B {tuple(lw.b.shape)}; slot "
                             f"{name!r} takes rank <= {spec.r} on a ({layer.out_features}, {layer.in_features}) layer")
    for n, layer in slots.items():
        a, b, lw = layer.lora_A[name], layer.lora_B[name], weights.layers.get(n)
        a.zero_()
        b.zero_()
        if lw is not None:
            a[: lw.r].copy_(lw.a)
            b[:, : lw.r].copy_(lw.b.float() * lw.scale)
            if lw.magnitude is not None:
                layer.lora_magnitude_vector[name].copy_(lw.magnitude)
    set_active_adapter(model, name)
