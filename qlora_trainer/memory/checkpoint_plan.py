"""How many decoder layers to checkpoint (``model.checkpoint_layers``), from the memory estimate.

Checkpointing a layer keeps only its input (B, T, H) and recomputes the rest in the backward: it
saves memory and costs a second forward of that layer. A run that fits without recomputing should
not recompute, so ``auto`` checkpoints the fewest layers that keep the estimated device footprint
within ``HEADROOM`` of the device's memory. The estimate is computed twice (every layer
checkpointed, none) and interpolated linearly: each un-checkpointed layer adds
(none - all) / layers bytes (its saved activations; the layer-backward moment is the same).
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)

HEADROOM = 0.9  # keep 10% of the device for fragmentation and what the estimate does not see


def layers_to_checkpoint(all_bytes: int, none_bytes: int, layers: int, budget_bytes: float) -> int:
    """The fewest checkpointed layers (0..layers) whose footprint, interpolated between
    ``all_bytes`` (every layer checkpointed) and ``none_bytes`` (none), is within
    ``HEADROOM * budget_bytes``. All layers when even that does not fit (the estimate warns)."""
    budget = HEADROOM * budget_bytes
    if none_bytes <= budget:
        return 0
    per_layer = max(none_bytes - all_bytes, 0) / max(layers, 1)
    if all_bytes >= budget or per_layer == 0:
        return layers
    kept = int((budget - all_bytes) // per_layer)  # layers that may keep their activations
    return max(0, layers - kept)


def device_budget(device: torch.device) -> int | None:
    """Total memory of a CUDA ``device`` in bytes; None elsewhere (no device budget to plan for)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[1]


def plan_checkpoint_layers(cfg, budget_bytes: int | None) -> int | None:
    """Layers to checkpoint for run config ``cfg`` (None = all): ``model.checkpoint_layers`` when it
    is ``all`` or a number; for ``auto`` the estimate's answer for ``budget_bytes`` (all when there is
    no budget, e.g. on the CPU, or the model's shape is unknown)."""
    from qlora_trainer.memory.estimate import estimate_for_config, resolve_arch

    setting = cfg.model.checkpoint_layers
    if setting == "all":
        return None
    if isinstance(setting, int):
        return setting
    if budget_bytes is None:
        return None
    arch, _ = resolve_arch(cfg.model.name_or_path)
    on = estimate_for_config(cfg)
    if arch is None or on is None:
        return None
    off_cfg = copy.deepcopy(cfg)
    off_cfg.model.gradient_checkpointing = False
    off_cfg.model.offload_activations = False
    off = estimate_for_config(off_cfg)
    n = layers_to_checkpoint(on.device_bytes, off.device_bytes, arch.layers, budget_bytes)
    log.info("model.checkpoint_layers=auto: %d of %d layers checkpointed (estimate %.1f GB all, %.1f GB "
             "none, device %.1f GB)", n, arch.layers, on.device_bytes / 1e9, off.device_bytes / 1e9,
             budget_bytes / 1e9)
    return n
