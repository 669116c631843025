"""The training loop's parts (``recipe.py`` strings them together): the micro-batch stream, signal
handling that never splits a step, ``metrics.jsonl``, the output-directory check, the memory estimate
logged at start, the progress bar."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.data import make_dataloader
from qlora_trainer.errors import DataError, QloraError
from qlora_trainer.io import atomic_write_text, writing
from qlora_trainer.memory.objectives import estimate_for_objective
from qlora_trainer.memory.checkpoint_plan import device_budget, plan_checkpoint_layers
from qlora_trainer.train.checkpoint import checkpoint_dirs
from qlora_trainer.train.resume import json_line, metrics_lines
from qlora_trainer.train.budget import finished_adapter_error

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)


def micro_batches(train_ds: Any, cfg: "Config", tokenizer: Any, epoch: int, skip: int, *, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Endless ``(epoch, batches consumed in that epoch, batch)``, starting after ``skip`` batches of
    ``epoch``. Each epoch's order depends only on (seed, epoch); the DataLoader iterator is created
    under ``fork_rng`` so starting an epoch never moves the global RNG (dropout stays in step on resume)."""
    while True:
        dl = make_dataloader(train_ds, cfg=cfg.data, tokenizer=tokenizer, batch_size=cfg.train.batch_size,
                             shuffle=True, seed=cfg.train.seed, epoch=epoch, rank=rank, world=world)
        with torch.random.fork_rng(devices=[]):
            it = iter(dl)
        n = 0
        for i, batch in enumerate(it):
            n = i + 1
            if i >= skip:
                yield epoch, i + 1, batch
        if n == 0:
            raise DataError(f"data.path: {cfg.data.path!r} yields no batches")
        epoch, skip = epoch + 1, 0


class Interrupts:
    """While training, Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, except inside ``held()``,
    where they wait for the block's end. A KeyboardInterrupt leaving the ``with`` block first runs
    ``on_interrupt``, then goes on (SIGTERM: as ``SystemExit(143)``). The previous handlers come back
    on exit. Handlers are installed from the main thread only, and never over an ignored signal."""

    def __init__(self, on_interrupt: Callable[[], None]) -> None:
        self.on_interrupt = on_interrupt
        self.signum: int | None = None
        self._held = self._pending = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                self.on_interrupt()
                if self.signum == signal.SIGTERM:
                    raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self._held:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt


def check_output_dir(cfg: "Config", out: Path, resume: Path | None, main: bool = True) -> None:
    finished = (out / "adapter" / "adapter_config.json").exists()
    if finished and not cfg.output.overwrite and not (cfg.resume == "auto" and resume is not None):
        raise QloraError(finished_adapter_error(out))
    if resume is None and checkpoint_dirs(out) and not cfg.output.overwrite:
        raise QloraError(f"output_dir: {str(out)!r} has checkpoints of an earlier run; set resume=auto to "
                         f"continue it or output.overwrite=true to start over")
    if resume is None and cfg.output.overwrite and main:
        import shutil

        for old in checkpoint_dirs(out):  # our step-N checkpoints only: other files there are the user's
            shutil.rmtree(old, ignore_errors=True)


def log_memory_estimate(cfg: "Config", device: torch.device) -> None:
    """Log the memory estimator's prediction; warn when it exceeds the GPU (advisory only)."""
    try:
        # the layers prepare_model checkpoints on this device (performance.checkpoint_layers); the
        # objective's step shape (2x sequences for preference pairs, GRPO's rollouts)
        est = estimate_for_objective(cfg, plan_checkpoint_layers(cfg, device_budget(device)))
    except Exception as e:  # noqa: BLE001 - the estimate is advisory; training goes on without it
        log.info("memory estimate unavailable: %s", e)
        return
    if est is None:  # shape unknown without a download; the estimator logged why
        return
    log.info("memory estimate: %.2f GB", est.total_gb)
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory / 1e9
        if not est.fits(budget):
            log.warning("memory estimate %.1f GB exceeds this GPU's %.1f GB: expect out-of-memory "
                        "(try a shorter data.seq_len, train.batch_size=1 or gradient checkpointing)",
                        est.total_gb, budget)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of the process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def progress_bar(cfg: "Config", initial: int, enabled: bool = True, desc: str = "train") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=initial, disable=not (cfg.output.progress_bar and enabled),
                desc=desc, unit="step", dynamic_ncols=True)


class MetricsFile:
    """Append-only ``metrics.jsonl``; on start, lines past ``keep_until`` (an interrupted run's steps
    after its last checkpoint) are dropped so a resumed run's log reads as one run."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        if path.exists():
            lines = metrics_lines(path, keep_until)  # a truncated last line (killed mid-write) is dropped
            atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(row))  # strict JSON: a non-finite value is written as null


class NoMetrics:
    """Ranks other than 0 write no metrics."""

    def write(self, row: dict[str, Any]) -> None:
        pass
