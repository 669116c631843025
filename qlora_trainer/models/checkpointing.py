"""Activation checkpointing per decoder layer, with optional CPU offload of the saved inputs.

``apply_checkpointing(model)`` replaces each decoder layer in ``<...>.layers`` by a
:class:`CheckpointedLayer` whose forward runs the original layer under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while training: of the whole
layer's activations only its input hidden state (B, T, H) is kept; everything else is recomputed
in the backward. The wrapper shares the wrapped layer's parameter/buffer/child registries instead
of nesting it, so parameter names and state-dict keys are unchanged (PEFT adapter files, optimizer
state and ``load_state_dict`` keep working).

Offload (``offload=True``): the checkpoint's one saved tensor, the layer's input hidden state, is
packed by ``torch.autograd.graph.saved_tensors_hooks`` into pinned CPU memory, copied
asynchronously on a side CUDA stream (the compute stream does not wait), and copied back when the
backward unpacks it, i.e. right before that layer's recompute. This moves B·T·H·2 bytes (bf16) per
layer off the GPU — for Llama-2-7B at B=1, T=4096 that is 32 MiB/layer, 1 GiB over 32 layers — at
the price of PCIe traffic. On CPU tensors offload is a no-op (logged once at apply time).
Not done: prefetching layer i-1's input during layer i's recompute (the copy back is on demand).

Caveats: the KV cache is disabled inside checkpointed layers while training (a recompute would
update it twice); transformers' ``output_hidden_states`` capture does not see wrapped layers;
transformers' own ``gradient_checkpointing_enable`` is switched off here so layers are not
checkpointed twice.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


class CpuOffloader:
    """Saved-tensor hooks that park packed tensors in pinned CPU memory (CUDA tensors only).

    ``packed`` counts the non-empty tensors seen and ``offloaded_bytes`` the bytes actually moved, per
    instance (for logs and tests)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.packed = 0
        self.offloaded_bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        if t.numel() == 0:  # torch < 2.13's checkpoint also saves an empty placeholder per call
            return t
        self.packed += 1
        if t.device.type != "cuda":
            return t
        stream = self._side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed
        cpu = torch.empty_like(t, device="cpu", pin_memory=True)
        with torch.no_grad(), torch.cuda.stream(stream):
            cpu.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)  # the allocator may not reuse t's memory before the copy ends
        self.offloaded_bytes += t.numel() * t.element_size()
        return t.device, cpu, done

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, cpu, done = packed
        torch.cuda.current_stream(device).wait_event(done)  # the D2H copy has landed
        return cpu.to(device, non_blocking=True)


CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")  # its name across transformers releases


def without_cache(kwargs: dict) -> dict:
    """``kwargs`` with every KV cache dropped (whatever its argument name: transformers 5.24 renamed
    ``past_key_values`` to ``cache``) and ``use_cache=False``: a recompute must not append the
    keys to a cache a second time."""
    from transformers.cache_utils import Cache

    out = {k: (None if k in CACHE_KWARGS or isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


class CheckpointedLayer(nn.Module):
    """A decoder layer run under non-reentrant activation checkpointing while training.

    Call signature is the wrapped layer's: ``(hidden_states (B, T, H), **kwargs)`` with
    transformers' kwargs (attention_mask, position_ids, position_embeddings, past_key_values,
    use_cache, ...) passed through unchanged. In eval mode or under ``no_grad`` it is the plain
    layer. Parameters/children are shared with the wrapped layer (not nested under a new name);
    other attributes (e.g. ``attention_type``) are read through from it."""

    def __init__(self, layer: nn.Module, offloader: CpuOffloader | None = None) -> None:
        super().__init__()
        self._parameters = layer._parameters
        self._buffers = layer._buffers
        self._non_persistent_buffers_set = layer._non_persistent_buffers_set
        self._modules = layer._modules
        object.__setattr__(self, "_layer", layer)  # deliberately not registered as a child
        object.__setattr__(self, "offloader", offloader)
        self.train(layer.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def train(self, mode: bool = True) -> "CheckpointedLayer":
        super().train(mode)
        self._layer.training = mode  # its children are ours and were set above
        return self

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self._layer
        if not (self.training and torch.is_grad_enabled()):
            return layer(hidden_states, *args, **kwargs)
        kwargs = without_cache(kwargs)

        def run(h: torch.Tensor) -> torch.Tensor:  # only h is saved by the checkpoint
            return layer(h, *args, **kwargs)

        hooks = self.offloader.hooks() if self.offloader is not None else contextlib.nullcontext()
        with hooks:
            return checkpoint(run, hidden_states, use_reentrant=False)

    def extra_repr(self) -> str:
        return f"wraps={type(self._layer).__name__}, offload={self.offloader is not None}"


def _decoder_layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"]


def mark_recompute_tail(layer: nn.Module) -> int:
    """Let a checkpointed ``layer``'s recompute skip its MLP's ``down_proj`` base matmul: the
    adapter term runs first and the base matmul after it (``LoRALinear.recompute_skips_base``), so torch's
    early stop ends the recompute once the adapter's tensors are saved (the layer's last saved
    tensors: what follows, the base matmul and the residual add, saves nothing). Returns how many
    projections were marked (0 for a frozen down_proj: its matmul saves nothing and is skipped anyway)."""
    n = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 2)[-2:] == ["mlp", "down_proj"] and \
                isinstance(getattr(module, "recompute_skips_base", None), bool):
            module.recompute_skips_base = True
            n += 1
    return n


def apply_checkpointing(model: nn.Module, *, offload: bool = False, max_layers: int | None = None) -> nn.Module:
    """Wrap every decoder layer of ``model`` (each ``nn.ModuleList`` named ``layers``) in a
    :class:`CheckpointedLayer`, in place; returns ``model``. Already-wrapped layers are kept.

    ``offload=True`` moves each layer's saved input hidden state (B·T·H·2 bytes in bf16) to pinned
    CPU memory on a side stream (a no-op for CPU tensors). ``max_layers``: checkpoint only the first
    that many layers of each list (None = all; ``performance.checkpoint_layers``); the others keep their
    activations and are not recomputed."""
    lists = _decoder_layer_lists(model)
    if not lists:
        raise ValueError(f"apply_checkpointing: no decoder `layers` ModuleList in {type(model).__name__}")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        logger.warning("apply_checkpointing: disabling transformers' gradient checkpointing "
                       "(layers would be checkpointed twice)")
        disable = getattr(model, "activation_checkpointing_disable", None) or \
            model.gradient_checkpointing_disable  # the name before transformers 5.x
        disable()
    if offload and not torch.cuda.is_available():
        logger.info("apply_checkpointing: offload requested but CUDA is unavailable; "
                    "checkpoint inputs stay where they are (no-op)")
    offloader = CpuOffloader() if offload else None
    wrapped = 0
    for layers in lists:
        for i, layer in enumerate(layers):
            if max_layers is not None and i >= max_layers:
                break
            if not isinstance(layer, CheckpointedLayer):
                mark_recompute_tail(layer)
                layers[i] = CheckpointedLayer(layer, offloader)
                wrapped += 1
    logger.info("apply_checkpointing: %d decoder layers checkpointed (offload=%s)", wrapped, offload)
    return model
