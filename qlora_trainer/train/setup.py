"""Turn a frozen base model into a trainable QLoRA model, and build its optimizer and LR schedule."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlora_trainer.kernels.base_weight import set_nf4_matmul
from qlora_trainer.lora import inject_lora, lora_param_groups
from qlora_trainer.lora.loftq import apply_loftq_from_config
from qlora_trainer.memory.checkpoint_plan import device_budget, plan_checkpoint_layers
from qlora_trainer.models.adapt import adapt_model
from qlora_trainer.models.checkpointing import apply_checkpointing
from qlora_trainer.models.compile import compile_layers
from qlora_trainer.models.cpu_embedding import apply_cpu_embeddings
from qlora_trainer.runtime import resolve_dtype
from qlora_trainer.kernels.backend import clear_references, resolve_backend
from qlora_trainer.kernels.selfcheck import ensure_kernels, kernels_for, shapes_class

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)

# optimizer name -> (bitsandbytes class, paged); "adamw" is torch's
_BNB = {"paged_adamw_8bit": ("AdamW8bit", True), "paged_adamw_32bit": ("AdamW32bit", True),
        "adamw_8bit": ("AdamW8bit", False)}
_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def adapter_dtype(cfg: "Config", device: torch.device) -> torch.dtype:
    """``lora.dtype`` resolved for ``device`` (``auto``: the runtime compute dtype)."""
    return resolve_dtype(cfg.lora.dtype, device)


def grouped_projections_on(cfg: "Config", *, training: bool = False) -> bool:
    """Whether q/k/v and gate/up run as grouped GEMMs (``performance.group_projections``), FSDP included
    (docs/distributed.md, "Grouped projections under FSDP"). ``training``: off with LoRA dropout,
    where the layers skip grouping (``grouping_operands``)."""
    on = cfg.performance.group_projections
    return on and not (training and cfg.lora.dropout > 0)


def prepare_model(model: nn.Module, cfg: "Config", *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Inject LoRA (everything else frozen), swap in kernel-backed modules, keep the input embeddings
    in CPU memory (``performance.embeddings_on_cpu``), checkpoint each decoder layer
    (``performance.gradient_checkpointing``), torch.compile each decoder layer (``performance.compile``), and
    put the model in train mode. In place; returns it."""
    backend = cfg.performance.kernels
    inject_lora(model, cfg.lora, dtype=adapter_dtype(cfg, device), backend=backend)
    if cfg.lora.init == "loftq":
        apply_loftq_from_config(model, cfg)
    adapt_model(model, backend, mlp_chunk_tokens=cfg.performance.mlp_chunk_tokens,
                group_projections=grouped_projections_on(cfg), fuse_add_norm=cfg.performance.fused_add_norm)
    if cfg.performance.nf4_matmul != "dequant":  # the large-M NF4 matmul path (kernels/base_weight.py)

        set_nf4_matmul(model, cfg.performance.nf4_matmul)
    if device.type == "cuda":
        check_run_kernels(model, cfg, device, dtype)
    if cfg.performance.embeddings_on_cpu:

        set_nf4_matmul(model, cfg.performance.nf4_matmul)
    if cfg.performance.embeddings_on_cpu:
        apply_cpu_embeddings(model)
    if cfg.performance.gradient_checkpointing:
        max_layers = plan_checkpoint_layers(cfg, device_budget(device))
        apply_checkpointing(model, offload=cfg.performance.offload_activations, max_layers=max_layers)
    if cfg.performance.compile != "none":
        compile_layers(model, cfg.performance.compile)
    # no model.to(device): the base is already there (moving 4-bit models is unsupported in places)
    # and adapters are created on their base layer's device
    return model.train()


def check_run_kernels(model: nn.Module, cfg: "Config", device: torch.device, dtype: torch.dtype) -> dict:
    """Each Triton kernel this run will use checked once against its torch reference on ``device``
    (cached per device, kernel version and shapes class: ``kernels/selfcheck.py``); a kernel that
    fails is switched to its reference for the run, with one warning line. Nothing to check when the
    kernels resolve to the torch references. Returns the verdicts by kernel."""

    if resolve_backend(cfg.performance.kernels, device) != "triton":
        clear_references()
        return {}
    mc = getattr(model, "config", None)
    sizes = [getattr(mc, k, 64) for k in ("hidden_size", "intermediate_size")]
    return ensure_kernels(device, dtype, kernels_for(dropout=cfg.lora.dropout > 0, nf4_matmul=cfg.performance.nf4_matmul),
                          shapes=shapes_class(*sizes))


def _bnb_works(cls: type, device: torch.device) -> bool:
    """One step of ``cls`` on a throw-away parameter: does this bitsandbytes build support ``device``?
    (8-bit state needs >= 4096 elements, hence the shape.)"""
    try:
        p = nn.Parameter(torch.zeros(64, 64, device=device))
        p.grad = torch.ones_like(p)
        opt = cls([p], lr=1e-3)
        opt.step()
        return bool(torch.isfinite(p).all())
    except Exception as e:  # noqa: BLE001 - any failure means "not supported here"
        log.debug("bitsandbytes %s unsupported on %s: %s", cls.__name__, device, e)
        return False


def build_optimizer(model: nn.Module, cfg: "Config") -> torch.optim.Optimizer:
    """AdamW over the trainable (adapter) parameters, LoRA+ groups from ``lora_param_groups``.

    ``paged_*`` use bitsandbytes' paged optimizers (state in CUDA unified memory, evicted to the CPU
    under pressure). Paging needs CUDA: on the CPU they run non-paged (one log line). If this
    bitsandbytes build cannot run the optimizer on the device at all, torch AdamW is used (logged).
    """
    t = cfg.train
    groups = lora_param_groups(model, t.lr, cfg.lora.loraplus_ratio, t.weight_decay)
    if not groups:
        raise RuntimeError("build_optimizer: the model has no trainable parameters (was LoRA injected?)")
    device = groups[0]["params"][0].device
    kwargs = dict(lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    name, paged = _BNB[t.optimizer]
    if paged and device.type != "cuda":
        log.info("optimizer: %s pages state through CUDA unified memory; on %s using non-paged %s",
                 t.optimizer, device.type, name)
        paged = False
    cls = getattr(bnb.optim, f"Paged{name}" if paged else name)
    if device.type != "cuda" and not _bnb_works(cls, device):
        log.warning("optimizer: bitsandbytes %s does not run on %s here; falling back to torch AdamW",
                    cls.__name__, device.type)
        return torch.optim.AdamW(groups, **kwargs)
    return cls(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "Config") -> Any:
    """``train.schedule`` after ``train.warmup_steps`` linear warm-up (transformers' schedulers)."""
    from transformers import get_scheduler

    t = cfg.train
    return get_scheduler(_SCHEDULES[t.schedule], optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=t.max_steps)
