"""qlora_trainer with the same hyperparameters as the HF stack: the NF4 (double quant) base from the
same checkpoint (``models.load.load_base_model``) or the identical tensors built in-process (70B),
then the trainer's own ``prepare_model`` (LoRA r=16, alpha=32 on all linear layers, kernels,
gradient checkpointing; ``spec.extra`` may set ``model`` / ``train`` / ``performance`` keys,
e.g. ``performance.compile``),
``build_optimizer`` (paged AdamW 8-bit) and ``causal_lm_loss`` (chunked
linear + cross-entropy, never full fp32 logits).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Built, system_main, trainable
from benchmarks.spec import RunSpec


def make_config(spec: RunSpec):
    """The trainer Config equivalent to the benchmark settings."""
    from qlora_trainer.config import Config

    cfg = Config()
    cfg.model.name_or_path = spec.checkpoint_dir or f"random:{spec.model}"
    cfg.model.tokenizer = spec.checkpoint_dir
    cfg.model.compute_dtype = spec.dtype
    cfg.performance.gradient_checkpointing = True
    cfg.performance.checkpoint_layers = "all"  # as the HF recipe (the memory goals); "auto" rows set it in extra
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets = spec.lora_r, spec.lora_alpha, 0.0, "all-linear"
    cfg.lora.dtype = "bfloat16" if spec.dtype == "bfloat16" else "float32"
    cfg.data.seq_len = spec.seq_len
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr = spec.batch, 1, spec.lr
    cfg.train.weight_decay, cfg.train.seed, cfg.train.device = 0.0, spec.seed, spec.device
    cfg.train.optimizer = "paged_adamw_8bit" if spec.paged else "adamw"
    for section in ("model", "train", "performance"):  # e.g. long context: mlp_chunk_tokens, offload
        for key, value in spec.extra.get(section, {}).items():
            if not hasattr(getattr(cfg, section), key):
                raise ValueError(f"spec.extra.{section}.{key}: no such {section} setting")
            setattr(getattr(cfg, section), key, value)
    return cfg.validate()


def build(spec: RunSpec) -> Built:
    from qlora_trainer.train import build_optimizer, causal_lm_loss, prepare_model

    cfg = make_config(spec)
    device, dtype = torch.device(spec.device), spec.torch_dtype
    if spec.weights == "in_process":
        from benchmarks.weights import build_nf4_in_process

        model = build_nf4_in_process(spec.model, seed=spec.seed, device=device, dtype=dtype)
    else:
        from qlora_trainer.models.load import load_base_model

        model = load_base_model(cfg, device=device, dtype=dtype)
    torch.manual_seed(spec.seed)
    model = prepare_model(model, cfg, device=device, dtype=dtype)
    model.train()
    optimizer = build_optimizer(model, cfg)
    params = trainable(model)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, n_tokens = causal_lm_loss(model, batch, chunk_size=cfg.performance.loss_chunk_size)
        return loss_sum / n_tokens  # token mean, as the HF stack reports

    return Built(loss_fn=loss_fn, optimizer=optimizer, vocab=model.config.vocab_size,
                 trainable_params=sum(p.numel() for p in params))


if __name__ == "__main__":
    raise SystemExit(system_main("qlora_trainer", build))
