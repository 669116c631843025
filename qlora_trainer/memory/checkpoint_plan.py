"""How many decoder layers to checkpoint (``performance.checkpoint_layers``), from the memory estimate.

Checkpointing a layer keeps only its input (B, T, H) and recomputes the rest in the backward: it
saves memory and costs a second forward of that layer. A run that fits without recomputing should
not recompute, so ``auto`` checkpoints the fewest layers (the first N) whose estimated device
footprint (``estimate(checkpointed_layers=N)``, the same estimate ``memory`` and ``estimate``
print) is within ``HEADROOM`` of the device's memory. The footprint falls monotonically with N, so
the answer is a bisection over 0..layers (a few microsecond-cheap estimates).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from qlora_trainer.memory.estimate import estimate_for_config, resolve_arch

log = logging.getLogger(__name__)

HEADROOM = 0.9  # keep 10% of the device for fragmentation and what the estimate does not see


def fewest_layers(footprint: Callable[[int], int], layers: int, budget_bytes: float) -> int:
    """The fewest checkpointed layers N in 0..layers with ``footprint(N) <= HEADROOM * budget_bytes``
    (``footprint`` non-increasing in N); all layers when even that does not fit (the estimate warns)."""
    budget = HEADROOM * budget_bytes
    if footprint(layers) > budget:
        return layers
    lo, hi = 0, layers  # invariant: footprint(hi) fits
    while lo < hi:
        mid = (lo + hi) // 2
        if footprint(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return hi


def device_budget(device: torch.device) -> int | None:
    """Memory of a CUDA ``device`` this process may use, in bytes: its total times the
    ``torch.cuda.set_per_process_memory_fraction`` cap where torch reports one; None elsewhere (no
    device budget to plan for)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.mem_get_info(device)[1]
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
    return int(total * fraction(device)) if fraction is not None else total


def plan_checkpoint_layers(cfg, budget_bytes: int | None) -> int | None:
    """Layers to checkpoint for run config ``cfg`` (None = all): ``performance.checkpoint_layers`` when it
    is ``all`` or a number; for ``auto`` the estimate's answer for ``budget_bytes`` (all when there is
    no budget, e.g. on the CPU, or the model's shape is unknown)."""
    setting = cfg.performance.checkpoint_layers
    if setting == "all":
        return None
    if isinstance(setting, int):
        return setting
    if budget_bytes is None:
        return None
    arch, _ = resolve_arch(cfg.model.name_or_path)
    if arch is None:  # (estimate_for_config would be None too)
        return None

    @functools.cache
    def footprint(n: int) -> int:
        return estimate_for_config(cfg, checkpointed_layers=n).device_bytes

    n = fewest_layers(footprint, arch.layers, budget_bytes)
    log.info("performance.checkpoint_layers=auto: %d of %d layers checkpointed (estimate %.1f GB, all %.1f GB, "
             "none %.1f GB; device %.1f GB)", n, arch.layers, footprint(n) / 1e9, footprint(arch.layers) / 1e9,
             footprint(0) / 1e9, budget_bytes / 1e9)
    return n
