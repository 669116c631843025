"""Put ``LoRALinear`` in place of the targeted linear layers (module replacement; the variant dispatch:
AdaLoRA has its own module), freeze the rest, and build the optimizer's parameter groups (LoRA+).
The module-tree helpers it uses live in ``lora/modules.py``."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from qlora_trainer.config import LoRAConfig
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora.experts import expert_lora_layers, inject_expert_lora
from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.lora.adalora import inject_adalora
from qlora_trainer.lora.modules import is_linear, linear_layers, match_targets, replace_module  # noqa: F401 (also here)
from qlora_trainer.lora.multi import lora_layers, set_active_adapter
from qlora_trainer.lora.router import inject_router_lora, router_lora_layers
from qlora_trainer.models.moe import experts_modules

log = logging.getLogger(__name__)


def inject_lora(model: nn.Module, cfg: LoRAConfig, *, dtype: torch.dtype, backend: str = "auto",
                adapter_name: str = "default") -> list[str]:
    """Add adapter ``adapter_name`` to every targeted linear layer, replacing it by ``LoRALinear``
    (a layer that already is one just gets another adapter), and make it the active adapter.

    Everything but the new adapter's parameters is frozen. Returns the replaced module names.
    Raises ConfigError when ``cfg.targets`` selects nothing (ValueError for an unknown ``cfg.variant``).
    """
    if cfg.variant == "adalora":  # SVD-form adapters with a rank allocator: their own module
        return inject_adalora(model, cfg, dtype=dtype, backend=backend, adapter_name=adapter_name)
    names = match_targets(model, cfg.targets)
    if not names:
        some = ", ".join(list(linear_layers(model))[:6])
        raise ConfigError(f"lora.targets: {cfg.targets!r} matches no linear layer (some names: {some})")
    spec = AdapterSpec.from_variant(cfg.variant, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, backend=backend)
            replace_module(model, name, module)
        # LoftQ sets A and B afterwards from the 16-bit weights (lora/loftq.py; train/setup.py)
        module.add_adapter(adapter_name, spec, dtype=dtype, init="kaiming" if cfg.init == "loftq" else cfg.init)
    names += _inject_experts(model, cfg, spec, dtype=dtype, adapter_name=adapter_name)
    names += _inject_router(model, cfg, spec, dtype=dtype, adapter_name=adapter_name)
    set_active_adapter(model, adapter_name)
    set_trainable(model, adapter_name)
    trainable, total = trainable_parameters(model)
    log.info("LoRA %s (%s, r=%d, alpha=%g) on %d layers: %s trainable of %s parameters (%.3f%%)",
             adapter_name, spec.variant, cfg.r, cfg.alpha, len(names), f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1))
    return names


def _inject_experts(model: nn.Module, cfg: LoRAConfig, spec: AdapterSpec, *, dtype: torch.dtype,
                    adapter_name: str) -> list[str]:
    """LoRA on the fused MoE expert weights (``lora.target_experts``; lora/experts.py), if any."""
    if not cfg.target_experts or not experts_modules(model):
        return []
    if spec.use_dora:
        log.warning("lora.variant dora: the fused MoE experts get no adapter (PEFT's target_parameters "
                    "has no DoRA); set lora.target_experts=false to silence this")
        return []
    names = inject_expert_lora(model, spec, dtype=dtype, adapter_name=adapter_name)
    log.info("LoRA %s on the experts of %d MoE layers (rank %d per expert, no dropout)",
             adapter_name, len(names), spec.r)
    return names


def _inject_router(model: nn.Module, cfg: LoRAConfig, spec: AdapterSpec, *, dtype: torch.dtype,
                   adapter_name: str) -> list[str]:
    """LoRA on the MoE routers (``lora.target_router``; lora/router.py), if any. The config refuses
    it with DoRA (``LoRAConfig.check``)."""
    if not cfg.target_router:
        return []
    names = inject_router_lora(model, spec, dtype=dtype, adapter_name=adapter_name)
    if names:
        log.info("LoRA %s on the routers of %d MoE layers (16-bit, rank %d, no dropout)", adapter_name, len(names),
                 spec.r)
    else:
        log.warning("lora.target_router: the model has no mixture-of-experts router we adapt (Mixtral, Qwen2/3-MoE "
                    "and OLMoE have one); nothing adapted there")
    return names


def set_trainable(model: nn.Module, adapter_name: str | None) -> None:
    """Only ``adapter_name``'s A, B (and DoRA magnitude) require grad; ``None`` freezes all adapters."""
    for layer in lora_layers(model).values():
        for d in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            for k, p in d.items():
                p.requires_grad_(k == adapter_name)
    for layer in expert_lora_layers(model).values():
        for d in (*layer.lora_A.values(), *layer.lora_B.values()):
            for k, p in d.items():
                p.requires_grad_(k == adapter_name)
    for layer in router_lora_layers(model).values():
        for d in (layer.lora_A, layer.lora_B):
            for k, p in d.items():
                p.requires_grad_(k == adapter_name)


def _numel(p: torch.Tensor) -> int:
    """Logical parameter count (a packed 4-bit weight holds two values per byte)."""
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical (out * in) size."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lora_param_groups(model: nn.Module, lr: float, loraplus_ratio: float = 1.0,
                      weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups for the trainable parameters (LoRA+, Hayou et al. 2024):

    - A matrices (and any other 2-D trainable weight): ``lr``, ``weight_decay``;
    - B matrices: ``lr * loraplus_ratio``, ``weight_decay``;
    - 1-D parameters (DoRA magnitudes): ``lr * loraplus_ratio``, no weight decay (as PEFT's
      ``create_loraplus_optimizer``).
    Empty groups are left out; each group carries a ``name``.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"lora_A": [], "lora_B": [], "lora_magnitude": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_B." in f".{name}.":
            groups["lora_B"].append(p)
        elif p.ndim == 1:
            groups["lora_magnitude"].append(p)
        else:
            groups["lora_A"].append(p)
    settings = {"lora_A": (lr, weight_decay), "lora_B": (lr * loraplus_ratio, weight_decay),
                "lora_magnitude": (lr * loraplus_ratio, 0.0)}
    return [{"name": k, "params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, ps in groups.items() if ps]
