"""``performance.compile``: torch.compile of each decoder layer, so the step launches fewer kernels and runs
less Python (``reduce-overhead``: CUDA graphs replay each layer's forward and backward).

What is compiled: each decoder layer's own forward (and, through AOTAutograd, its backward), *inside*
its gradient checkpoint (``models/checkpointing.py``): the checkpoint stays eager, so its recompute
calls the same compiled graph again, with the RNG state it restored (LoRA dropout draws its seed
tensor from the device generator: ``kernels/dropout.py``; no host integer is captured). The
compiled layer is one graph, so that recompute runs all of it: the eager early stop that skips
down_proj's base matmul (``LoRALinear.recompute_skips_base``) does not happen. The loss (chunked linear +
cross-entropy) and the optimizer stay eager.

Our kernels under dynamo: the LoRA / frozen-linear autograd Functions are traced (forward and
backward) with their torch references as plain aten ops and their Triton launchers as user-defined
Triton kernels (dynamo's ``triton_kernel_wrapper``); the frozen base weight's cache is filled here
before compiling (its check reads storage pointers dynamo cannot trace) and read unchecked while
tracing (``kernels/base_weight.base_weight``); the step counters count nothing inside a graph.
Anything dynamo cannot trace is a graph break (that piece runs eagerly), never a patched library.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qlora_trainer.kernels.backend import resolve_backend
from qlora_trainer.kernels.base_weight import base_weight
from qlora_trainer.models.checkpointing import CheckpointedLayer, _decoder_layer_lists
from qlora_trainer.kernels.grouped_linear import warm_groups

log = logging.getLogger(__name__)

MODES = {"default": None, "reduce-overhead": "reduce-overhead"}  # performance.compile -> torch.compile mode


def warm_base_weights(model: nn.Module) -> int:
    """Build the cached frozen-weight object of every LoRA layer's base (``base_layer``, its
    ``backend``) and of every frozen ``NF4Linear`` (itself, its ``kernel_backend``), for the
    weight's device, so that compiled code finds it; returns how many were built or found."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "kernel_backend", None), str):
            base, backend = m, m.kernel_backend
        else:
            base, backend = getattr(m, "base_layer", None), getattr(m, "backend", None)
        weight = getattr(base, "weight", None)
        if isinstance(base, nn.Module) and isinstance(backend, str) and isinstance(weight, torch.Tensor):
            n += base_weight(base, resolve_backend(backend, weight.device)) is not None
    return n


def compile_layers(model: nn.Module, mode: str, *, backend: str | None = None) -> int:
    """``nn.Module.compile`` (in place) every decoder layer of ``model`` (each ``nn.ModuleList``
    named ``layers``; a checkpointed layer's wrapped layer, not its checkpoint) with
    ``mode`` (``default | reduce-overhead``) and torch.compile ``backend`` (None: inductor; the CPU
    tests use ``aot_eager``). Returns the number of layers compiled."""
    if mode not in MODES:
        raise ValueError(f"compile_layers: mode {mode!r} is not one of {', '.join(MODES)}")

    warm_base_weights(model)
    warm_groups(model)  # cached objects read unchecked while tracing: one graph serves every layer
    kwargs = {"mode": MODES[mode]} if backend is None else {"backend": backend}
    n = 0
    for layers in _decoder_layer_lists(model):
        for layer in layers:
            target = layer._layer if isinstance(layer, CheckpointedLayer) else layer
            target.compile(**kwargs)
            n += 1
    log.info("performance.compile=%s: %d decoder layers compiled (torch.compile backend %s)", mode, n,
             backend or "inductor")
    return n
