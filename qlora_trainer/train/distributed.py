"""Data-parallel training on accelerate: one process per device, ``train.distributed: ddp | fsdp``.

``accelerate launch --num_processes N -m qlora_trainer.cli train CONFIG`` starts N copies of the
trainer; accelerate's ``Accelerator`` joins them into one process group (NCCL on GPUs, gloo on the
CPU) and gives each its device. This module holds everything that differs from one process:

* **the engine** (:meth:`Parallel.wrap`): the module a micro-batch goes through,
  :class:`LossModule` (model -> summed token loss). ``ddp``: accelerate wraps it in torch DDP
  (replicated model, gradients averaged in buckets during backward). ``fsdp``: torch FSDP2
  ``fully_shard`` on every decoder layer and on the engine (the root: embeddings, final norm,
  lm_head), so the frozen NF4 base (bitsandbytes ``quant_storage`` = the compute dtype), norms and
  embeddings are sharded across ranks and all-gathered one layer at a time. The LoRA tensors are
  FSDP ``ignored_params``: replicated (r=16 on 70B: 0.4 GB in bf16), so checkpoints, the adapter
  file and resume are the single-process ones; their gradients are averaged once per step
  (:meth:`Parallel.sync_grads`).
* **the exact global token mean**: every rank divides its summed token loss by the step's *global*
  loss-token count (:meth:`Parallel.sum`, one all-reduce per step) and multiplies by the world size;
  the engine's gradient *mean* over ranks then equals d(sum of all token losses / global count),
  the one-device loss (the multiply and divide are by N: exact for powers of two).
* **rank 0 writes** (metrics, checkpoints, the adapter); the others wait at a barrier.
  Checkpoints hold every rank's RNG state (``rng.pt["ranks"]``, gathered to rank 0); data
  position is one number for all ranks (they step together, see ``data.collate.shard_order``).

Settings that silently corrupt weights under FSDP (checked at start, :func:`check_fsdp_dtypes`):
the packed 4-bit bytes live in a ``quant_storage``-typed tensor, so any cast of it (an FSDP
mixed-precision ``param_dtype`` different from ``quant_storage``, e.g. bf16 storage gathered as
fp32) reinterprets the bytes as numbers and converts them: wrong weights and no error. We set
``param_dtype`` to the compute dtype and require ``quant_storage`` (and every other sharded
parameter) to equal it. ``uint8`` storage cannot be sharded at all (rejected by the config).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.runtime import launched_world, resolve_device, resolve_dtype
from qlora_trainer.models.checkpointing import _decoder_layer_lists
from qlora_trainer.models.loss import causal_lm_loss
from qlora_trainer.models.quantize import is_4bit
from qlora_trainer.train.checkpoint import restore_rng, set_rng_state
from qlora_trainer.train.trackers import accelerator_kwargs
from qlora_trainer.io import FIX_CHECKPOINT, read_torch

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)


class LossModule(nn.Module):
    """``batch -> (loss_sum (), n_tokens ())``: the causal-LM loss as a module, so DDP and FSDP see
    the whole forward (their hooks run on the engine's ``forward``)."""

    def __init__(self, model: nn.Module, *, chunk_size: int = 0, backend: str = "auto",
                 loss: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.model, self.chunk_size, self.backend = model, chunk_size, backend
        self.loss = loss or causal_lm_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.model, batch, chunk_size=self.chunk_size, backend=self.backend)


@dataclass
class Parallel:
    """This process's place in the run. ``mode``: ``none | ddp | fsdp``; ``rank`` 0..``world``-1."""

    accelerator: Any
    mode: str
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers (one all-reduce, float64)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def load_device(self) -> torch.device:
        """Where to build the base model: FSDP on CUDA builds it in CPU memory and ``fully_shard``
        moves one layer at a time to the GPU, keeping only this rank's shard there (the whole NF4
        base never sits on one GPU); otherwise this rank's device."""
        return torch.device("cpu") if self.mode == "fsdp" and self.device.type == "cuda" else self.device

    def loss_scale(self, n_global: int) -> float:
        """Factor on a micro-batch's summed loss: world / global token count (see module docstring)."""
        return self.world / max(n_global, 1)

    def wrap(self, model: nn.Module, cfg: "Config", dtype: torch.dtype,
             loss: Callable[..., Any] | None = None) -> nn.Module:
        """The engine for ``model``: a :class:`LossModule` (``loss``: default ``causal_lm_loss``),
        wrapped per ``mode``."""
        engine = LossModule(model, chunk_size=cfg.performance.loss_chunk_size, backend=cfg.performance.kernels, loss=loss)
        if self.mode == "fsdp":
            return shard_fsdp(engine, model, dtype, self.device)
        if self.mode == "ddp" and self.world > 1:
            return self.accelerator.prepare_model(engine, device_placement=False)
        return engine

    def no_sync(self, engine: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """DDP: skip the gradient all-reduce on every micro-batch but a step's last."""
        if last or self.mode != "ddp" or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(engine)

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """FSDP: average the replicated (ignored) LoRA gradients over ranks, one flat all-reduce."""
        if self.mode != "fsdp" or self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, piece in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(piece.view_as(g))

    def gather_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG ``state``; with several ranks (collective), rank 0's plus ``ranks``:
        every rank's, in rank order (``checkpoint.set_rng_state`` reads rank 0's keys only)."""
        if self.world == 1:
            return state
        import torch.distributed as dist

        ranks: list[Any] = [None] * self.world
        dist.all_gather_object(ranks, state)
        return dict(state, ranks=ranks)

    def restore_rng(self, path: Path) -> None:
        """Restore this rank's RNG from checkpoint ``path``; error if it was written by another world size."""

        state = read_torch(path / "rng.pt", FIX_CHECKPOINT)
        ranks = state.get("ranks")
        written = len(ranks) if ranks is not None else 1
        if written != self.world:
            raise QloraError(f"resume: {str(path)!r} was written by {written} process(es), this launch has "
                             f"{self.world}; relaunch with --num_processes {written} (each rank's data shard "
                             f"and RNG depend on it)")
        if ranks is None:
            restore_rng(path)
        else:
            set_rng_state(ranks[self.rank])


def setup(cfg: "Config") -> Parallel:
    """Start (or join) the process group through accelerate and check the launch against
    ``train.distributed``. One-line errors for a mismatch."""
    from accelerate import Accelerator

    world, mode = launched_world(), cfg.train.distributed
    if world > 1 and mode == "none":
        raise QloraError(f"train.distributed: launched with {world} processes but set to none; set "
                         f"train.distributed=ddp (replicated model) or fsdp (sharded base)")
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model.compute_dtype, device)

    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" and dtype == torch.bfloat16 else "no",
                              cpu=device.type == "cpu", **accelerator_kwargs(cfg))  # + output.report_to trackers
    if accelerator.num_processes != world:
        raise QloraError(f"train.distributed: accelerate sees {accelerator.num_processes} processes, "
                         f"WORLD_SIZE is {world}; launch with accelerate launch --num_processes N")
    if device.type == "cuda":
        device = accelerator.device  # cuda:<local rank>
    if mode == "fsdp" and world == 1:
        _single_process_group(device)
    return Parallel(accelerator, mode, accelerator.process_index, world, device)


def _single_process_group(device: torch.device) -> None:
    """FSDP without a launcher (world size 1, e.g. checking the FSDP path on one GPU): a process
    group of one over an in-process store, so ``fully_shard`` has a mesh."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


# --------------------------------------------------------------------------------------------------
# FSDP2


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_fsdp_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """Before sharding: every sharded parameter (the frozen base: packed NF4 storage, embeddings,
    norms) must be in the FSDP ``param_dtype`` ``dtype`` (= the compute dtype). A 4-bit weight in
    another dtype would be cast, i.e. its packed bytes converted as numbers: silently wrong weights."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        if type(p).__name__ == "Params4bit" and p.dtype != dtype:
            raise QloraError(f"quantization.quant_storage: {dtype_name(p.dtype)} but FSDP gathers in the compute "
                             f"dtype {dtype_name(dtype)} ({name}); casting packed 4-bit bytes corrupts the weights "
                             f"- set quantization.quant_storage={dtype_name(dtype)}")
        if p.dtype != dtype:
            raise QloraError(f"train.distributed=fsdp: parameter {name} is {dtype_name(p.dtype)}, FSDP gathers "
                             f"{dtype_name(dtype)}; set model.compute_dtype to match the model's dtype")


def _keep_quant_state(model: nn.Module) -> None:
    """FSDP2 all-gathers a 4-bit weight into a plain Parameter, which has lost bitsandbytes'
    ``quant_state``. Keep it on the layer (``Linear4bit.quant_state``, where bitsandbytes itself
    looks when the weight lost it) and re-attach it before each use, by a forward pre-hook on the
    4-bit layer and on its LoRA wrapper. Our kernels read the kept state too
    (``kernels.base_weight.quant_state_of``): grouped q/k/v and gate/up never call the members'
    forward, so without it the first forward fell back to member-wise LoRA and the checkpoint's
    recompute grouped (a saved-tensor count mismatch)."""
    def hook(base: nn.Module) -> Any:
        def attach(_module: nn.Module, _args: Any) -> None:
            if getattr(base.weight, "quant_state", None) is None:
                base.weight.quant_state = base.quant_state
        return attach

    for module in list(model.modules()):
        base = getattr(module, "base_layer", module)
        if is_4bit(base):
            if getattr(base, "quant_state", None) is None:
                base.quant_state = base.weight.quant_state
            module.register_forward_pre_hook(hook(base))


def shard_fsdp(engine: LossModule, model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer (checkpointing wrapper included), the input
    embeddings, then the engine (root unit: final norm, lm_head, gathered for the whole step since
    the loss reads ``lm_head.weight`` directly). Trainable (LoRA) tensors are ignored: replicated,
    moved to ``device`` here (FSDP moves what it manages; bitsandbytes' quant states too, below)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_fsdp_dtypes(model, dtype)
    _keep_quant_state(model)
    trainable = {p for p in model.parameters() if p.requires_grad}
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = [layer for lst in _decoder_layer_lists(model) for layer in lst]
    for layer in layers:
        fully_shard(layer, mp_policy=mp, ignored_params=trainable & set(layer.parameters()))
    embed = model.get_input_embeddings()
    fully_shard(embed, mp_policy=mp, ignored_params=trainable & set(embed.parameters()))
    fully_shard(engine, mp_policy=mp, ignored_params=trainable)
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(device)
    for module in model.modules():
        if getattr(module, "quant_state", None) is not None and type(module.quant_state).__name__ == "QuantState":
            module.quant_state.to(device)  # in place: the layers' constants (not FSDP-managed) follow
    local, total = _frozen_bytes(model)
    log.info("fsdp: rank holds %d of %d frozen parameter bytes", local, total)
    log.info("fsdp: %d decoder layers sharded (param dtype %s), %d trainable tensors replicated",
             len(layers), dtype, len(trainable))
    return engine


def _frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's shards, bytes unsharded) over the frozen (FSDP-managed) parameters."""
    local = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        t = getattr(p, "_local_tensor", p)
        local += t.numel() * t.element_size()
        total += p.numel() * p.element_size()
    return local, total
