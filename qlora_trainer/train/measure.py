"""Real training steps on a GPU with a synthetic NF4 model, profiled phase by phase (``--measure``).

Runs our stack only (``prepare_model`` -> ``causal_lm_loss`` -> ``build_optimizer``); the HF-stack
figures come from :mod:`qlora_trainer.memory.references`.
"""

from __future__ import annotations

from qlora_trainer.memory.profile import Profiler, memory_history
from qlora_trainer.config import Config
from qlora_trainer.models.synthetic import synthetic_nf4_model
from qlora_trainer.train import build_optimizer, causal_lm_loss, prepare_model


def measure_training(arch, *, seq_len: int, batch: int = 1, lora_r: int = 16, optimizer: str = "paged_adamw_8bit",
                     checkpointing: bool = True, offload: bool = False, lora_dropout: float = 0.05,
                     embeddings_on_cpu: bool = False, steps: int = 2, snapshot: str | None = None,
                     reader=None) -> Profiler:
    """Build ``arch`` in NF4 on CUDA, add LoRA, run ``steps`` training steps and one eval forward.

    ``snapshot``: write a ``torch.cuda.memory`` history snapshot of the last step to this path.
    Raises QloraError without CUDA (from :class:`~qlora_trainer.memory.profile.CudaReader`).
    """
    import torch

    prof = Profiler(reader)
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = lora_r, 2.0 * lora_r, lora_dropout
    cfg.performance.embeddings_on_cpu = embeddings_on_cpu
    cfg.train.optimizer, cfg.train.batch_size, cfg.data.seq_len = optimizer, batch, seq_len
    cfg.performance.gradient_checkpointing, cfg.performance.offload_activations = checkpointing, offload
    with prof.phase("load"):
        model = synthetic_nf4_model(arch, device=device, compute_dtype=dtype)
    with prof.phase("adapters"):
        model = prepare_model(model, cfg, device=device, dtype=dtype)
        opt = build_optimizer(model, cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device, generator=gen)
    data = {"input_ids": ids, "labels": ids.clone()}
    for i in range(steps):
        with memory_history(snapshot if i == steps - 1 else None):
            with prof.phase("forward"):
                loss, n = causal_lm_loss(model, data)
            with prof.phase("backward"):
                (loss / n).backward()
            with prof.phase("step"):
                opt.step()
                opt.zero_grad(set_to_none=False)
    model.eval()
    with prof.phase("eval"), torch.no_grad():
        causal_lm_loss(model, data)
    return prof
