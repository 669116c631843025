"""What each adapter-combination method keeps of two tasks (the ``combining-adapters`` notebook).

Two LoRA adapters are trained on the pretrained small model (``small_lm``), each on its own task:

- ``math``: GSM8K word problems (``finetune.gsm8k_text``), held out on the test split;
- ``caps``: the plays in upper case (the model has only seen them in mixed case), held out on the
  pretraining tail.

Every combination method of ``qlora_trainer.lora.combine`` then merges the two (weights w, w and
one density) into one adapter, and the eval loss on each task is measured. What a method *keeps*
of a task is the share of that task's own adapter's improvement it retains::

    kept = (L_base - L_combined) / (L_base - L_own adapter)       1 = all of it, 0 = none

The base is the 16-bit small model (the combination works on adapters only; the NF4 case is in
tests/lora/test_combine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from support.small_lm import SmallLM, encode, eval_windows, evaluate, fresh_copy, train_steps

TASKS = ("math", "caps")
METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class CombineStudyConfig:
    """Settings of the study (both adapters train with the same ones)."""

    r: int = 8
    """Rank of each task adapter (``cat``'s result has rank 2r; ``svd`` truncates back to r)."""
    alpha: float = 16.0
    """Adapter scale numerator."""
    steps: int = 40
    """Optimizer steps per task adapter."""
    lr: float = 3e-3
    """Peak learning rate (cosine after warm-up)."""
    batch_size: int = 4
    """Windows per step."""
    seq_len: int = 128
    """Tokens per window."""
    eval_windows: int = 8
    """Held-out windows per task."""
    weights: tuple[float, float] = (1.0, 1.0)
    """Combination weight of the math and the caps adapter."""
    density: float = 0.5
    """Share of entries kept by ties, dare_* and magnitude_prune."""
    methods: tuple[str, ...] = METHODS
    """Combination methods to compare."""
    seed: int = 0
    """Adapter init, window order and DARE's draws."""


@dataclass
class CombineStudy:
    """Eval losses per task: of the base, of each task adapter, and of each combination."""

    cfg: CombineStudyConfig
    base: dict[str, float]
    own: dict[str, dict[str, float]]  # adapter task -> eval task -> loss
    combined: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> eval task -> loss
    ranks: dict[str, int] = field(default_factory=dict)  # method -> rank of its result

    def kept(self, method: str, task: str) -> float:
        """Share of ``task``'s own adapter improvement that ``method``'s combination retains."""
        gain = self.base[task] - self.own[task][task]
        return (self.base[task] - self.combined[method][task]) / gain

    def rows(self) -> list[dict]:
        """One flat dict per method (for a table)."""
        return [{"method": m, "rank": self.ranks[m],
                 **{f"loss_{t}": round(self.combined[m][t], 4) for t in TASKS},
                 **{f"kept_{t}": round(self.kept(m, t), 3) for t in TASKS}} for m in self.combined]


def task_data(lm: SmallLM, *, train_records: int = 600, eval_records: int = 100) -> dict[str, tuple]:
    """task -> (train ids, eval ids), 1-D byte-token tensors."""
    from support.finetune import gsm8k_text
    from support.small_lm import shakespeare_text

    text = shakespeare_text()
    cut = int(len(text) * lm.cfg.train_fraction)
    return {"math": (encode(gsm8k_text("train", max_records=train_records)),
                     encode(gsm8k_text("test", max_records=eval_records))),
            "caps": (encode(text[:cut].upper()), encode(text[cut:].upper()))}


def train_task_adapter(lm: SmallLM, train_ids: torch.Tensor, cfg: CombineStudyConfig) -> torch.nn.Module:
    """A copy of the small model with one LoRA adapter (``default``) trained on ``train_ids``."""
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora import inject_lora, lora_param_groups

    model = fresh_copy(lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        inject_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=0.0), dtype=torch.float32, backend="torch")
    opt = torch.optim.AdamW(lora_param_groups(model, cfg.lr), lr=cfg.lr)
    train_steps(model, opt, train_ids, steps=cfg.steps, warmup_steps=3, seq_len=cfg.seq_len,
                batch_size=cfg.batch_size, seed=cfg.seed)
    return model


def run_study(lm: SmallLM, cfg: CombineStudyConfig = CombineStudyConfig(), data: dict | None = None) -> CombineStudy:
    """Train the two task adapters, combine them with every method, evaluate everything."""
    from qlora_trainer.lora.combine import combine_adapters
    from qlora_trainer.lora.multi import delete_adapter, disable_adapters, set_active_adapter
    from qlora_trainer.lora.peft_format import attach_adapter, model_adapter_weights

    data = data or task_data(lm)
    windows = {t: eval_windows(data[t][1], seq_len=cfg.seq_len, max_windows=cfg.eval_windows) for t in TASKS}
    adapters, own = {}, {}
    for task in TASKS:
        model = train_task_adapter(lm, data[task][0], cfg)
        own[task] = {t: evaluate(model, windows[t]) for t in TASKS}
        adapters[task] = model_adapter_weights(model)
    with disable_adapters(model):
        base = {t: evaluate(model, windows[t]) for t in TASKS}
    study = CombineStudy(cfg, base, own)
    pair = [adapters[t] for t in TASKS]
    for method in cfg.methods:
        generator = torch.Generator().manual_seed(cfg.seed)
        combined = combine_adapters(pair, list(cfg.weights), method, density=cfg.density, generator=generator)
        attach_adapter(model, combined, adapter_name=method, dtype=torch.float32, backend="torch")
        study.combined[method] = {t: evaluate(model, windows[t]) for t in TASKS}
        study.ranks[method] = max(lw.r for lw in combined.layers.values())
        set_active_adapter(model, None)
        delete_adapter(model, method)
    return study
