"""Fine-tune the pretrained small model on a held-out task: full FT, 16-bit LoRA or QLoRA.

The held-out task is a different text style: GSM8K math word problems (``$QLORA_DATA/gsm8k``),
rendered as ``Question: ...\\nAnswer: ...`` and read as a byte stream. The pretrained model has only
seen Shakespeare, so its loss on GSM8K starts high and fine-tuning has something to learn.

Every method sees the same windows in the same order (same seed), so eval losses compare the
methods, not the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch

from support.small_lm import SmallLM, encode, eval_windows, evaluate, fresh_copy, train_steps

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run."""

    method: Method = "qlora"
    """``full`` (every weight, fp32), ``lora`` (fp32 base + adapters) or ``qlora`` (NF4+DQ base + adapters)."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Adapter scale numerator (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    targets: str | tuple[str, ...] = "all-linear"
    """``all-linear`` or module-name patterns such as ``("q_proj", "v_proj")``."""
    variant: Literal["lora", "rslora", "dora"] = "lora"
    """Adapter variant (``lora.variant``)."""
    dropout: float = 0.0
    """Adapter input dropout."""
    steps: int = 30
    """Optimizer steps."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay after warm-up)."""
    warmup_steps: int = 3
    """Linear warm-up steps."""
    batch_size: int = 4
    """Windows per step."""
    seq_len: int = 128
    """Tokens per window."""
    seed: int = 0
    """Adapter init and window order."""
    eval_windows: int = 16
    """Held-out windows for the eval loss."""


@dataclass
class FinetuneResult:
    """Outcome of one run: eval loss before and after, the training curve, parameter counts."""

    cfg: FinetuneConfig
    eval_before: float
    eval_after: float
    losses: list[float] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    model: torch.nn.Module | None = field(default=None, repr=False)
    """The fine-tuned model (eval mode), for generation after the run."""

    def row(self) -> dict:
        """A flat dict for tables."""
        c = self.cfg
        targets = c.targets if isinstance(c.targets, str) else ",".join(c.targets)
        return {"method": c.method, "variant": c.variant, "r": c.r, "targets": targets,
                "trainable": self.trainable, "eval_before": round(self.eval_before, 4),
                "eval_after": round(self.eval_after, 4), "seconds": round(self.seconds, 1)}


def gsm8k_text(split: str, *, max_records: int) -> str:
    """The first ``max_records`` GSM8K records of ``split`` (``train|test``) as one text."""
    from qlora_trainer.errors import DataError
    from support.paths import data_root

    path = data_root() / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; set $QLORA_DATA to the directory holding gsm8k/")
    parts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(parts) >= max_records:
                break
            try:
                rec = json.loads(line)
                parts.append(f"Question: {rec['question']}\nAnswer: {rec['answer']}\n\n")
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{path}:{lineno}: bad GSM8K record ({e})") from None
    return "".join(parts)


def task_data(*, train_records: int = 1000, eval_records: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, eval ids): GSM8K train / test as 1-D byte-token id tensors."""
    return (encode(gsm8k_text("train", max_records=train_records)),
            encode(gsm8k_text("test", max_records=eval_records)))


def prepare(lm: SmallLM, cfg: FinetuneConfig) -> torch.nn.Module:
    """A fresh copy of the pretrained model set up for ``cfg.method`` (NF4 base for ``qlora``,
    LoRA injected for ``lora``/``qlora``, everything trainable for ``full``)."""
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora import inject_lora
    from qlora_trainer.models.quantize import quantize_model

    model = fresh_copy(lm)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "qlora":
        quantize_model(model, compute_dtype=torch.float32, double_quant=True)
    elif cfg.method != "lora":
        raise ValueError(f"method must be full, lora or qlora, got {cfg.method!r}")
    targets = cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)
    lcfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets, variant=cfg.variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        inject_lora(model, lcfg, dtype=torch.float32, backend="torch")
    return model


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.method == "full":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    from qlora_trainer.lora import lora_param_groups

    return torch.optim.AdamW(lora_param_groups(model, cfg.lr), lr=cfg.lr)


def finetune(lm: SmallLM, cfg: FinetuneConfig, train_ids: torch.Tensor, eval_ids: torch.Tensor) -> FinetuneResult:
    """Run one fine-tuning job on ``train_ids`` and measure the eval loss on ``eval_ids`` before/after."""
    from qlora_trainer.lora import trainable_parameters

    model = prepare(lm, cfg)
    windows = eval_windows(eval_ids, seq_len=cfg.seq_len, max_windows=cfg.eval_windows)
    before = evaluate(model, windows)
    trainable, total = trainable_parameters(model)
    losses, seconds = train_steps(model, _optimizer(model, cfg), train_ids, steps=cfg.steps,
                                  warmup_steps=cfg.warmup_steps, seq_len=cfg.seq_len,
                                  batch_size=cfg.batch_size, seed=cfg.seed)
    after = evaluate(model, windows)
    return FinetuneResult(cfg, before, after, losses, trainable, total, seconds, model.eval())
