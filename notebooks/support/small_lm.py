"""A small Llama pretrained on tinyshakespeare with the byte tokenizer, cached for the notebooks.

The model is the catalog's ``tiny`` shape (hidden 128, 4 layers, GQA 4/2 heads, vocab 260, ~0.8M
parameters): 150 steps of 8 x 128 bytes in fp32 on the CPU (~1-2 minutes on 2 idle cores) take it from
5.6 nats (uniform over 260 bytes) to ~2.4 nats per byte on the held-out tail of the plays, enough
structure for quantization and fine-tuning comparisons to mean something.

The first caller of :func:`load_or_pretrain` trains it and saves ``model.safetensors`` +
``meta.json`` under ``<cache>/small_lm-<hash of the settings>/`` (atomically); later callers load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmallLMConfig:
    """Pretraining settings (all of them go into the cache key)."""

    arch: str = "tiny"
    """Catalog architecture (``qlora_trainer.models.catalog``); must have the byte vocab (260)."""
    seq_len: int = 128
    """Tokens (bytes) per training window."""
    batch_size: int = 8
    """Windows per step."""
    steps: int = 150
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 0 after warm-up)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    train_fraction: float = 0.9
    """Leading share of the text used for pretraining; the rest is held out for evaluation."""
    seed: int = 0
    """Seed for the initial weights and the window sampling."""


@dataclass
class SmallLM:
    """A pretrained small model with its data splits (1-D long tensors of byte-token ids)."""

    model: torch.nn.Module
    cfg: SmallLMConfig
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    losses: list[float] = field(default_factory=list)
    """Pretraining loss per step."""
    eval_loss: float = float("nan")
    """Mean loss on the held-out tail of the text."""
    seconds: float = 0.0
    """Pretraining wall time (0 when loaded from the cache)."""
    from_cache: bool = False


def shakespeare_text() -> str:
    """``$QLORA_DATA/tinyshakespeare/input.txt`` (a DataError naming the path if it is missing)."""
    from qlora_trainer.errors import DataError
    from support.paths import data_root

    path = data_root() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found; set $QLORA_DATA to the directory holding tinyshakespeare/input.txt")
    return path.read_text(encoding="utf-8")


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D long tensor (no BOS/EOS).

    Without ``tokenizer``: the built-in byte tokenizer's ids, which are by construction the UTF-8
    bytes (``tests/notebooks/support`` checks this against ``models.tiny.byte_tokenizer``); reading the bytes
    directly takes milliseconds where the tokenizer takes seconds on the 1 MB corpus.
    """
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def sample_windows(ids: torch.Tensor, *, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens from the 1-D ``ids``: (B, seq_len) long."""
    if ids.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {ids.numel()}")
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, *, seq_len: int, max_windows: int) -> torch.Tensor:
    """The first ``max_windows`` non-overlapping windows of ``ids``: (W, seq_len) long (deterministic)."""
    n = min(max_windows, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    return ids[: n * seq_len].view(n, seq_len)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` (B, T) under ``model`` (scalar, nats/token), through
    the trainer's ``causal_lm_loss`` (hidden states + chunked linear cross-entropy)."""
    from qlora_trainer.models.loss import causal_lm_loss

    loss_sum, n_tokens = causal_lm_loss(model, {"input_ids": tokens, "labels": tokens}, backend="torch")
    return loss_sum / n_tokens


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> float:
    """Mean loss over ``windows`` (W, T), in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i: i + batch_size]
        total += lm_loss(model, chunk).item() * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / count


def split_ids(text: str, train_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(leading ``train_fraction`` of ``text``'s byte ids, the held-out rest): 1-D long tensors."""
    ids = encode(text)
    cut = int(ids.numel() * train_fraction)
    return ids[:cut], ids[cut:]


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor | None, *, steps: int,
                warmup_steps: int, seq_len: int, batch_size: int, seed: int,
                log_name: str | None = None, batch_fn=None) -> tuple[list[float], float]:
    """``steps`` optimizer steps on random (batch_size, seq_len) windows of the 1-D ``ids`` (window
    order from ``seed``), cosine LR after warm-up, gradients of the trainable parameters clipped to
    norm 1. ``batch_fn(step) -> {input_ids, labels, ...}`` replaces the windows (e.g. masked
    prompt/answer batches). Logs every 50th loss as ``<log_name> step N`` when ``log_name`` is set.
    Returns (loss per step, seconds)."""
    from qlora_trainer.models.loss import causal_lm_loss
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if batch_fn is None:
            loss = lm_loss(model, sample_windows(ids, seq_len=seq_len, batch_size=batch_size, generator=gen))
        else:
            loss_sum, n_tokens = causal_lm_loss(model, batch_fn(step), backend="torch")
            loss = loss_sum / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_name and step % 50 == 0:
            log.info("%s step %d loss %.3f", log_name, step, losses[-1])
    return losses, time.perf_counter() - t0


def pretrain(cfg: SmallLMConfig = SmallLMConfig(), *, text: str | None = None,
             eval_windows_max: int = 64) -> SmallLM:
    """Train ``cfg.arch`` from random init on the leading ``train_fraction`` of ``text``
    (default: tinyshakespeare); fp32 on the CPU. Returns the model (eval mode) and its data splits."""
    from qlora_trainer.models.tiny import random_model

    train_ids, held_ids = split_ids(text if text is not None else shakespeare_text(), cfg.train_fraction)
    model = random_model(cfg.arch, dtype=torch.float32, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    losses, seconds = train_steps(model, opt, train_ids, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                  seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                  log_name="pretrain")
    model.eval()
    ev = evaluate(model, eval_windows(held_ids, seq_len=cfg.seq_len, max_windows=eval_windows_max))
    return SmallLM(model, cfg, train_ids, held_ids, losses, ev, seconds)


def cache_key(cfg: SmallLMConfig, text: str) -> str:
    """Short hash of the settings and the text, naming the cache entry."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True) + hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save(lm: SmallLM, path: Path) -> None:
    """Write ``model.safetensors`` and ``meta.json`` into directory ``path`` atomically."""
    from safetensors.torch import save_file

    from qlora_trainer.io import atomic_directory

    meta = {"cfg": dataclasses.asdict(lm.cfg), "losses": lm.losses, "eval_loss": lm.eval_loss,
            "seconds": lm.seconds}
    with atomic_directory(path) as tmp:
        state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def load_or_pretrain(cfg: SmallLMConfig = SmallLMConfig(), *, cache: Path | None = None) -> SmallLM:
    """The pretrained small model for ``cfg``: loaded from ``<cache>/small_lm-<key>`` when present,
    else trained with :func:`pretrain` and saved there. ``cache`` defaults to ``research.paths.cache_dir()``."""
    from safetensors.torch import load_file

    from support.paths import cache_dir

    text = shakespeare_text()
    path = (cache or cache_dir()) / f"small_lm-{cache_key(cfg, text)}"
    if (path / "model.safetensors").is_file() and (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        model = _with_state(cfg, load_file(str(path / "model.safetensors")))
        return SmallLM(model, cfg, *split_ids(text, cfg.train_fraction), meta["losses"], meta["eval_loss"],
                       meta["seconds"], from_cache=True)
    lm = pretrain(cfg, text=text)
    save(lm, path)
    return lm


def fresh_copy(lm: SmallLM) -> torch.nn.Module:
    """An independent fp32 copy of the pretrained model (for one fine-tuning run)."""
    return _with_state(lm.cfg, lm.model.state_dict())


def _with_state(cfg: SmallLMConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh fp32 ``cfg.arch`` model holding ``state``, in eval mode."""
    from qlora_trainer.models.tiny import random_model

    model = random_model(cfg.arch, dtype=torch.float32, seed=cfg.seed)
    model.load_state_dict(state)
    return model.eval()
