"""``train(cfg)``: the whole run — load, prepare, optimise with gradient accumulation, log, checkpoint,
resume exactly, save the adapter.

One optimizer step = ``train.grad_accum`` micro-batches; the step's loss is the token mean over all of
them (each micro-batch's summed loss is divided by the step's total loss-token count before
``backward``), so accumulation is exact whatever the padding.

Ctrl-C or SIGTERM during training saves a checkpoint of the last completed optimizer step (partial
accumulated gradients are dropped), then re-raises KeyboardInterrupt (SIGTERM: ``SystemExit(143)``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.errors import DataError, QloraError
from qlora_trainer.io import writing
from qlora_trainer.train.checkpoint import (TrainerState, checkpoint_dirs, load_checkpoint, resolve_resume,
                                            rng_state, save_checkpoint)
from qlora_trainer.train.guards import StepGuard, check_finite_params, clean_temporaries, preflight
from qlora_trainer.train.loss import causal_lm_loss
from qlora_trainer.train.objectives import build_objective
from qlora_trainer.train.objectives.step import accumulate
from qlora_trainer.train.resume import check_data, check_resume_config, data_fingerprint, json_line, metrics_lines

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did (``losses``: this invocation's step losses, in order)."""

    output_dir: Path
    adapter_dir: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: Path | None = None


def train(cfg: "Config", *, stop_after: int | None = None) -> TrainResult:
    """Run training as configured. ``stop_after`` ends this invocation after that many optimizer
    steps with a checkpoint (a planned pre-emption; ``resume: auto`` continues it)."""
    from accelerate.utils import set_seed

    from qlora_trainer.data import build_datasets
    from qlora_trainer.data.templates import add_marker_tokens
    from qlora_trainer.lora import save_adapter
    from qlora_trainer.lora.tokens import make_tokens_trainable
    from qlora_trainer.models.load import load_base_model, load_tokenizer
    from qlora_trainer.lora.adalora import allocator_for
    from qlora_trainer.runtime import resolve_dtype
    from qlora_trainer.speed.report import StepTimeCheck
    from qlora_trainer.train import distributed
    from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model
    from qlora_trainer.train.trackers import start_trackers

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    par = distributed.setup(cfg)  # the process group (accelerate launch) and this rank's device
    if par.is_main:
        preflight(cfg, out)  # output location, our leftover temporaries, the model directory: before loading
    resume = resolve_resume(cfg)
    _check_output_dir(cfg, out, resume, main=par.is_main)
    check_resume_config(cfg, resume)  # refuses a changed config (resume_allow_changes overrides)
    par.barrier()
    device, accelerator = par.device, par.accelerator
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    _log_memory_estimate(cfg, device)
    step_time = StepTimeCheck.start(cfg, device)  # predicted step now, measured beside it after a few steps

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    new_tokens = add_marker_tokens(tokenizer, cfg.data)  # data.marker_tokens=add: before the model is sized
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)  # data errors before loading
    if len(train_ds) == 0:
        raise DataError(f"data.path: {cfg.data.path!r} yields no training samples")
    fingerprint = data_fingerprint(train_ds)
    check_data(cfg, resume, fingerprint)  # refuses changed data before the model loads
    model = load_base_model(cfg, device=par.load_device, dtype=dtype, vocab_size=len(tokenizer))
    model = prepare_model(model, cfg, device=device, dtype=dtype)
    make_tokens_trainable(model, new_tokens)  # the added tokens' embedding / output rows train
    allocator = allocator_for(model, cfg)  # lora.variant adalora: rank budget reallocation, else None
    objective = build_objective(cfg, tokenizer)  # train.objective: the loss a micro-batch contributes (train/objectives)
    if objective.name != "sft" and eval_ds is not None:
        log.info("train.objective=%s: no held-out loss evaluation (eval_fraction / eval_path ignored)", objective.name)
        eval_ds = None
    engine = par.wrap(model, cfg, dtype, loss=causal_lm_loss if objective.name == "sft" else objective.loss)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    state = TrainerState(data=fingerprint)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, scheduler)
        state.data = fingerprint
        par.restore_rng(resume)
        if allocator is not None:
            allocator.resume(state.step)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", resume, state.step, state.epoch, state.batch)
    elif par.world > 1:
        torch.manual_seed(cfg.train.seed + par.rank)  # the model is built alike on every rank; dropout differs
    metrics = _MetricsFile(out / "metrics.jsonl", keep_until=state.step) if par.is_main else _NoMetrics()
    metrics = start_trackers(accelerator, cfg, metrics)  # metrics.jsonl + output.report_to trackers
    params = [p for p in model.parameters() if p.requires_grad]
    stream = _micro_batches(train_ds, cfg, tokenizer, state.epoch, state.batch, rank=par.rank, world=par.world)
    result = TrainResult(output_dir=out, adapter_dir=None, step=state.step, resumed_from=resume)
    bar = _progress(cfg, state.step, enabled=par.is_main)
    window_tokens, window_t = 0, time.perf_counter()
    steps_this_run = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    saved, rng = (state.step, resume), par.gather_rng(rng_state())  # (step, path) of the last checkpoint; RNG after the last step

    def checkpoint(sync: bool = True) -> None:  # the last completed step, unless saved already
        nonlocal saved  # rank 0 writes; its `rng` holds every rank's state after that step (gathered in it)
        if state.step != saved[0]:
            path = save_checkpoint(model, optimizer, scheduler, state, cfg, rng=rng) if par.is_main else None
            saved = state.step, path
            if sync:
                par.barrier()

    def on_interrupt() -> None:
        bar.close()
        checkpoint(sync=False)  # no collective: the other ranks may be stopping anywhere
        log.warning("interrupted after step %d (%s); continue with resume=auto", state.step,
                    f"checkpoint {saved[1]}" if saved[1] else "nothing to resume from")

    guard = StepGuard(cfg.train.skip_bad_steps, on_stop=checkpoint)  # non-finite steps are never applied
    with _Interrupts(on_interrupt) as interrupts:
        while state.step < cfg.train.max_steps and (stop_after is None or steps_this_run < stop_after):
            micro = [next(stream) for _ in range(cfg.train.grad_accum)]
            if objective.name != "sft":  # the objective runs the micro-batches (train/objectives/step.py)
                res = accumulate(objective, engine, [b for _, _, b in micro], par, accelerator, device,
                                 model=model, step=state.step)
                step_metrics, n_loss = res.metrics, int(res.scored_tokens)
                window_tokens += res.input_tokens
            else:
                step_metrics = {}
                n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, _, b in micro)
                n_loss = int(par.sum([n_local])[0])  # the global token count: the loss is the global token mean
                step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
                for k, (_, _, batch) in enumerate(micro):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with par.no_sync(engine, last=k == len(micro) - 1):
                        with accelerator.autocast():
                            loss_sum, _ = engine(batch)
                        (loss_sum * par.loss_scale(n_loss)).backward()
                    step_loss += loss_sum.detach()
                    window_tokens += int(batch["input_ids"].numel())
            if allocator is not None:  # AdaLoRA's orthogonality penalty, once per optimizer step (same on every rank)
                allocator.orthogonality_backward(cfg.lora.adalora_orth_reg_weight)
            par.sync_grads(params)
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if objective.name != "sft":
                loss, window_all = res.loss, par.sum([window_tokens])[0]
            else:
                loss_total, window_all = par.sum([float(step_loss), window_tokens])  # global: ranks decide alike
                loss = loss_total / max(n_loss, 1)
            if guard.bad(state.step + 1, loss, grad_norm):  # skipped: data moves on
                optimizer.zero_grad(set_to_none=True)
                state.epoch, state.batch, rng = micro[-1][0], micro[-1][1], par.gather_rng(rng_state())
                continue
            lr = optimizer.param_groups[0]["lr"]
            with interrupts.held():  # a step is applied and logged whole or not at all
                optimizer.step()
                scheduler.step()
                if allocator is not None and allocator.step(state.step) and allocator.final(state.step):
                    metrics.write({"step": state.step + 1, "adalora_ranks": allocator.ranks()})  # per layer
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                steps_this_run += 1
                step_time.tick()
                state.epoch, state.batch = micro[-1][0], micro[-1][1]
                state.tokens += n_loss
                rng = par.gather_rng(rng_state())
                result.losses.append(loss)
                if state.step % cfg.output.log_every == 0 or state.step == cfg.train.max_steps:
                    now = time.perf_counter()
                    tok_s = window_all / max(now - window_t, 1e-9)
                    row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                           "grad_norm": round(grad_norm, 6), "tokens_per_s": round(tok_s, 1),
                           "mem_gb": round(_memory_gb(device), 3), "tokens": state.tokens}
                    row.update({k: round(v, 6) for k, v in step_metrics.items()})  # preference rewards, margins
                    if allocator is not None:
                        row["adalora_budget"] = allocator.budget
                    metrics.write(row)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                    mem=f"{row['mem_gb']:.2f}GB")
                    window_tokens, window_t = 0, now
                bar.update(1)
            if eval_ds is not None and cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                result.eval_loss = evaluate(model, eval_ds, cfg, tokenizer, device, accelerator, engine=engine)
                metrics.write({"step": state.step, "eval_loss": result.eval_loss})
            if cfg.train.eval_tasks and (state.step == cfg.train.max_steps or (
                    cfg.train.eval_every and state.step % cfg.train.eval_every == 0)):
                from qlora_trainer.evaluate import training_eval  # generation tasks (evaluate/runner.py)

                if par.is_main:  # DDP: every rank holds the whole model; rank 0 generates, the others wait
                    metrics.write(training_eval(model, tokenizer, cfg, state.step))
                par.barrier()
            if cfg.train.save_every and state.step % cfg.train.save_every == 0:
                checkpoint()
        bar.close()
        checkpoint()
        if state.step >= cfg.train.max_steps:
            if eval_ds is not None and not (cfg.train.eval_every and state.step % cfg.train.eval_every == 0):
                result.eval_loss = evaluate(model, eval_ds, cfg, tokenizer, device, accelerator, engine=engine)
                metrics.write({"step": state.step, "eval_loss": result.eval_loss})
            check_finite_params(model, state.step)  # never a NaN adapter
            if par.is_main:
                with writing(out / "adapter"):
                    result.adapter_dir = save_adapter(model, out / "adapter", cfg=cfg.lora,
                                                      base_model=cfg.model.name_or_path, tokenizer=tokenizer,
                                                      run_config=cfg, revision=cfg.model.revision)
                log.info("adapter saved to %s", result.adapter_dir)
            par.barrier()
    metrics.end()
    if par.is_main:
        clean_temporaries(out)
    result.step, result.tokens, result.seconds = state.step, state.tokens, time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_ds: Any, cfg: "Config", tokenizer: Any, device: torch.device,
             accelerator: Any, engine: torch.nn.Module | None = None) -> float:
    """Token-mean loss over ``train.eval_batches`` batches of ``eval_ds`` (all when 0), dropout off.
    Leaves the global RNG untouched, so evaluating does not change the training run. ``engine``: the
    distributed engine (``train.distributed``) to run batches through instead of the bare model."""
    from qlora_trainer.data import make_dataloader

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        dl = make_dataloader(eval_ds, cfg=cfg.data, tokenizer=tokenizer, batch_size=cfg.train.batch_size,
                             shuffle=False, seed=cfg.train.seed)
        for i, batch in enumerate(dl):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                loss_sum, n = engine(batch) if engine is not None else causal_lm_loss(
                    model, batch, chunk_size=cfg.train.loss_chunk_size, backend=cfg.model.kernels)
            total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def _micro_batches(train_ds: Any, cfg: "Config", tokenizer: Any, epoch: int, skip: int, *, rank: int = 0,
                   world: int = 1) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Endless ``(epoch, batches consumed in that epoch, batch)``, starting after ``skip`` batches of
    ``epoch``. Each epoch's order depends only on (seed, epoch); the DataLoader iterator is created
    under ``fork_rng`` so starting an epoch never moves the global RNG (dropout stays in step on resume)."""
    from qlora_trainer.data import make_dataloader

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


class _Interrupts:
    """While training, Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, except inside ``held()``,
    where they wait for the block's end. A KeyboardInterrupt leaving the ``with`` block first runs
    ``on_interrupt``, then goes on (SIGTERM: as ``SystemExit(143)``). The previous handlers come back
    on exit. Handlers are installed from the main thread only, and never over an ignored signal."""

    def __init__(self, on_interrupt: Callable[[], None]) -> None:
        self.on_interrupt = on_interrupt
        self.signum: int | None = None
        self._held = self._pending = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupts":
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


def _check_output_dir(cfg: "Config", out: Path, resume: Path | None, main: bool = True) -> None:
    if (out / "adapter" / "adapter_config.json").exists() and not cfg.output.overwrite:
        raise QloraError(f"output_dir: {str(out)!r} already holds a finished adapter; pick another "
                         f"output_dir or set output.overwrite=true")
    if resume is None and checkpoint_dirs(out) and not cfg.output.overwrite:
        raise QloraError(f"output_dir: {str(out)!r} has checkpoints of an earlier run; set resume=auto to "
                         f"continue it or output.overwrite=true to start over")
    if resume is None and cfg.output.overwrite and main:
        import shutil

        for old in checkpoint_dirs(out):  # our step-N checkpoints only: other files there are the user's
            shutil.rmtree(old, ignore_errors=True)


def _log_memory_estimate(cfg: "Config", device: torch.device) -> None:
    """Log the memory estimator's prediction; warn when it exceeds the GPU (advisory only)."""
    try:
        from qlora_trainer.memory.checkpoint_plan import device_budget, plan_checkpoint_layers
        from qlora_trainer.memory.objectives import estimate_for_objective

        # the layers prepare_model checkpoints on this device (model.checkpoint_layers); the
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


def _memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of the process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _progress(cfg: "Config", initial: int, enabled: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=initial, disable=not (cfg.output.progress_bar and enabled),
                desc="train", unit="step", dynamic_ncols=True)


class _MetricsFile:
    """Append-only ``metrics.jsonl``; on start, lines past ``keep_until`` (an interrupted run's steps
    after its last checkpoint) are dropped so a resumed run's log reads as one run."""

    def __init__(self, path: Path, keep_until: int) -> None:
        from qlora_trainer.io import atomic_write_text

        self.path = path
        if path.exists():
            lines = metrics_lines(path, keep_until)  # a truncated last line (killed mid-write) is dropped
            atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(row))  # strict JSON: a non-finite value is written as null


class _NoMetrics:
    """Ranks other than 0 write no metrics."""

    def write(self, row: dict[str, Any]) -> None:
        pass
