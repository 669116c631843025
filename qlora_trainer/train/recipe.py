"""The training recipe (torchtune's shape): ``setup_*`` builds the run's parts, :meth:`Recipe.step` is one
optimizer step over accumulated micro-batches, :meth:`Recipe.train` runs the loop, and ``train(cfg)``
is the public entry.

One optimizer step = ``train.grad_accum`` micro-batches; the step's loss is the token mean over all of
them (each micro-batch's summed loss is divided by the step's total loss-token count before
``backward``), so accumulation is exact whatever the padding.

What is not the plain step plugs in, never as a branch in the loop:

- the **objective**: ``Recipe.loss`` (micro-batch -> (summed loss, loss tokens)); ``causal_lm_loss``
  for SFT. A new objective is a loss object (or a ``Recipe`` subclass whose ``setup_*`` builds what
  it needs, e.g. a reference model);
- **hooks** (:class:`Hook`): AdaLoRA's rank allocator, the eval-loss and generation evals, and
  whatever a new method adds at the same points.

Ctrl-C or SIGTERM during training saves a checkpoint of the last completed optimizer step (partial
accumulated gradients are dropped), then re-raises KeyboardInterrupt (SIGTERM: ``SystemExit(143)``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.data import build_datasets
from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.data.templates import add_marker_tokens
from qlora_trainer.errors import DataError
from qlora_trainer.evaluate import training_eval
from qlora_trainer.evaluate.perplexity import mean_loss
from qlora_trainer.io import writing
from qlora_trainer.lora import save_adapter
from qlora_trainer.lora.adalora import RankAllocator, allocator_for
from qlora_trainer.lora.tokens import make_tokens_trainable
from qlora_trainer.models.load import load_base_model, load_tokenizer
from qlora_trainer.models.loss import causal_lm_loss
from qlora_trainer.runtime import resolve_dtype
from qlora_trainer.train import distributed
from qlora_trainer.train.budget import already_complete, budget_label, checkpoint_step, resolve_budget
from qlora_trainer.train.checkpoint import TrainerState, load_checkpoint, resolve_resume, rng_state, save_checkpoint
from qlora_trainer.train.guards import StepGuard, check_finite_params, clean_temporaries, preflight
from qlora_trainer.train.lock import output_lock
from qlora_trainer.train.objectives import build_objective
from qlora_trainer.train.objectives.step import accumulate
from qlora_trainer.train.loop import (Interrupts, MetricsFile, NoMetrics, check_output_dir, log_memory_estimate,
                                      memory_gb, micro_batches, progress_bar)
from qlora_trainer.train.resume import check_data, check_resume_config, data_fingerprint
from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model
from qlora_trainer.train.trackers import start_trackers

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
    already_complete: bool = False  # resume=auto on a finished run whose budget was reached: nothing done


@dataclass
class StepStats:
    """One optimizer step: ``loss`` (token mean over the step, all ranks), ``grad_norm`` (before
    clipping), ``lr`` (used by the step), ``loss_tokens`` (global), ``skipped`` (non-finite: not applied)."""

    loss: float
    grad_norm: float
    lr: float
    loss_tokens: int
    skipped: bool = False


class Hook:
    """A recipe extension point; override what you need. Called in this order each step:
    ``after_backward`` (all micro-batches' gradients accumulated, before their sync and clipping),
    ``after_optimizer_step`` (inside the applied step, gradients not yet zeroed, ``state.step`` not yet
    advanced), ``log_fields`` (extra fields of a logged metrics row), ``after_step`` (the step applied
    and logged). ``on_resume`` runs once after a checkpoint is loaded, ``on_finish`` once the last
    step is done, before the adapter is saved."""

    def on_resume(self, recipe: "Recipe") -> None: ...

    def after_backward(self, recipe: "Recipe") -> None: ...

    def after_optimizer_step(self, recipe: "Recipe") -> None: ...

    def log_fields(self, recipe: "Recipe") -> dict[str, Any]:
        return {}

    def after_step(self, recipe: "Recipe") -> None: ...

    def on_finish(self, recipe: "Recipe") -> None: ...


class AdaLoRAHook(Hook):
    """AdaLoRA (``lora.variant: adalora``): the orthogonality penalty once per step, then the rank
    budget reallocation after each optimizer step (it reads the gradients)."""

    def __init__(self, allocator: RankAllocator) -> None:
        self.allocator = allocator

    def on_resume(self, recipe: "Recipe") -> None:
        self.allocator.resume(recipe.state.step)

    def after_backward(self, recipe: "Recipe") -> None:  # same on every rank
        self.allocator.orthogonality_backward(recipe.cfg.lora.adalora.orth_reg_weight)

    def after_optimizer_step(self, recipe: "Recipe") -> None:
        step = recipe.state.step
        if self.allocator.step(step) and self.allocator.final(step):
            recipe.metrics.write({"step": step + 1, "adalora_ranks": self.allocator.ranks()})  # per layer

    def log_fields(self, recipe: "Recipe") -> dict[str, Any]:
        return {"adalora_budget": self.allocator.budget}


class EvalLossHook(Hook):
    """The eval split's token-mean loss every ``eval.every`` steps and after the last one."""

    def __init__(self, eval_ds: Any) -> None:
        self.eval_ds = eval_ds

    def _due(self, step: int, cfg: "Config") -> bool:
        return bool(cfg.eval.every) and step % cfg.eval.every == 0

    def _run(self, recipe: "Recipe") -> None:
        r = recipe
        r.result.eval_loss = mean_loss(r.model, self.eval_ds, r.cfg, r.tokenizer, r.device,
                                       autocast=r.accelerator.autocast, max_batches=r.cfg.eval.batches,
                                       loss=r.engine)
        r.metrics.write({"step": r.state.step, "eval_loss": r.result.eval_loss})

    def after_step(self, recipe: "Recipe") -> None:
        if self._due(recipe.state.step, recipe.cfg):
            self._run(recipe)

    def on_finish(self, recipe: "Recipe") -> None:
        if not self._due(recipe.state.step, recipe.cfg):
            self._run(recipe)


class GenerationEvalHook(Hook):
    """``eval.tasks``: generate and score on rank 0 every ``eval.every`` steps and at the end."""

    def after_step(self, recipe: "Recipe") -> None:
        cfg, step = recipe.cfg, recipe.state.step
        if step == cfg.train.max_steps or (cfg.eval.every and step % cfg.eval.every == 0):
            if recipe.par.is_main:  # DDP: every rank holds the whole model; rank 0 generates, the others wait
                recipe.metrics.write(training_eval(recipe.model, recipe.tokenizer, cfg, step))
            recipe.par.barrier()


class Recipe:
    """Supervised fine-tuning of a (4-bit) base with adapters. ``setup()`` runs the ``setup_*`` steps in
    order; :meth:`train` runs the loop; :meth:`step` is one optimizer step and can be driven alone."""

    # the objective: (model, batch, chunk_size=, backend=) -> (summed loss, loss tokens); None = causal_lm_loss
    loss: Callable[..., tuple[torch.Tensor, Any]] | None = None

    def __init__(self, cfg: "Config") -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.hooks: list[Hook] = []
        self.applying: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.window_tokens, self.window_t = 0, time.perf_counter()  # input tokens since the last logged row
        self.bar: Any = None  # the progress bar while train() runs
        self.step_metrics: dict[str, float] = {}  # the objective's metrics of the last step (rewards, margins)

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.setup_run()
        self.setup_data()
        if self.already_complete:
            return
        self.setup_model()
        self.setup_optimizer()
        self.setup_state()
        self.setup_trackers()

    def setup_run(self) -> None:
        """Process group and device, checks before anything loads, the resume point, the seed."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.par = par = distributed.setup(cfg)  # the process group (accelerate launch) and this rank's device
        if par.is_main:
            preflight(cfg, self.out)  # output location, our leftovers, the model directory, eval tasks
        self.resume = resolve_resume(cfg)
        check_output_dir(cfg, self.out, self.resume, main=par.is_main)
        check_resume_config(cfg, self.resume)  # refuses a changed config (resume_allow_changes overrides)
        par.barrier()
        self.device, self.accelerator = par.device, par.accelerator
        self.dtype = resolve_dtype(cfg.model.compute_dtype, self.device)
        log_memory_estimate(cfg, self.device)
        set_seed(cfg.train.seed)

    def setup_data(self) -> None:
        """Tokenizer (with marker tokens) and datasets: data errors surface before the model loads."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.new_tokens = add_marker_tokens(self.tokenizer, cfg.data)  # before the model is sized
        self.train_ds, self.eval_ds = build_datasets(cfg.data, self.tokenizer, seed=cfg.train.seed)
        if len(self.train_ds) == 0:
            raise DataError(f"data.path: {cfg.data.path!r} yields no training samples")
        self.fingerprint = data_fingerprint(self.train_ds)
        check_data(cfg, self.resume, self.fingerprint)  # refuses changed data before the model loads
        # train.epochs -> train.max_steps (the schedule and the bar count steps); the label keeps the unit
        self.budget_label = budget_label(cfg, cfg.train.epochs)
        self.cfg = resolve_budget(cfg, self.train_ds, self.tokenizer, rank=self.par.rank, world=self.par.world)
        # resume=auto on a finished run that already reached this budget: nothing to do
        self.already_complete = already_complete(self.cfg, self.out, self.resume)

    def setup_model(self) -> None:
        """The base model, adapters, kernels and checkpointing; the engine that runs the objective."""
        cfg, par = self.cfg, self.par
        model = load_base_model(cfg, device=par.load_device, dtype=self.dtype, vocab_size=len(self.tokenizer))
        self.model = model = prepare_model(model, cfg, device=self.device, dtype=self.dtype)
        make_tokens_trainable(model, self.new_tokens)  # the added tokens' embedding / output rows train
        allocator = allocator_for(model, cfg)  # lora.variant adalora: rank budget reallocation, else None
        if allocator is not None:
            self.hooks.append(AdaLoRAHook(allocator))
        # train.objective: what a micro-batch contributes (train/objectives); SFT runs the plain step
        self.objective = build_objective(cfg, self.tokenizer)
        if self.objective.name != "sft" and self.eval_ds is not None:
            log.info("train.objective=%s: no held-out loss evaluation (eval_fraction / eval_path ignored)",
                     self.objective.name)
            self.eval_ds = None
        loss = self.loss or (causal_lm_loss if self.objective.name == "sft" else self.objective.loss)
        # micro-batch -> summed loss (DDP / FSDP when launched so)
        self.engine = par.wrap(model, cfg, self.dtype, loss=loss)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def setup_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def setup_state(self) -> None:
        """Step counters and the data position: fresh, or from the resume checkpoint (RNG last)."""
        cfg, par = self.cfg, self.par
        self.state = TrainerState(data=self.fingerprint)
        if self.resume is not None:
            self.state = load_checkpoint(self.resume, self.model, self.optimizer, self.scheduler)
            self.state.data = self.fingerprint
            par.restore_rng(self.resume)
            for hook in self.hooks:
                hook.on_resume(self)
            log.info("resumed from %s (step %d, epoch %d, batch %d)", self.resume, self.state.step,
                     self.state.epoch, self.state.batch)
        elif par.world > 1:
            torch.manual_seed(cfg.train.seed + par.rank)  # the model is built alike on every rank; dropout differs
        self.guard = StepGuard(cfg.train.skip_bad_steps, on_stop=self.save_checkpoint)  # never applies a NaN step

    def setup_trackers(self) -> None:
        """``metrics.jsonl`` (rank 0) and the ``output.report_to`` trackers; the eval hooks."""
        cfg, par = self.cfg, self.par
        metrics = MetricsFile(self.out / "metrics.jsonl", keep_until=self.state.step) if par.is_main else NoMetrics()
        self.metrics = start_trackers(self.accelerator, cfg, metrics)
        if self.eval_ds is not None:
            self.hooks.append(EvalLossHook(self.eval_ds))
        if cfg.eval.tasks:
            self.hooks.append(GenerationEvalHook())
        self.result = TrainResult(output_dir=self.out, adapter_dir=None, step=self.state.step,
                                  resumed_from=self.resume)
        self.saved = (self.state.step, self.resume)  # (step, path) of the last checkpoint
        self.rng = par.gather_rng(rng_state())  # every rank's RNG after the last step

    # -- the step -----------------------------------------------------------------------------------

    def step(self, micro: list[tuple[int, int, dict[str, torch.Tensor]]]) -> StepStats:
        """One optimizer step over ``micro`` (``(epoch, batches consumed, batch)`` each): forward and
        backward of every micro-batch, its summed loss scaled by 1 / (the step's global loss-token
        count), gradient sync, clipping to ``train.max_grad_norm``, then (unless the loss or norm is
        non-finite) optimizer and scheduler step and the data position advanced."""
        cfg, par, state = self.cfg, self.par, self.state
        if self.objective.name == "sft":
            step_loss, n_loss, self.step_metrics = self._accumulate_sft(micro)
        else:  # the objective runs the micro-batches (train/objectives/step.py)
            res = accumulate(self.objective, self.engine, [b for _, _, b in micro], par, self.accelerator,
                             self.device, model=self.model, step=state.step)
            step_loss, n_loss, self.step_metrics = None, int(res.scored_tokens), res.metrics
            self.window_tokens += res.input_tokens
        for hook in self.hooks:
            hook.after_backward(self)
        par.sync_grads(self.params)
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if step_loss is None:
            loss, self.window_all = res.loss, par.sum([self.window_tokens])[0]
        else:
            loss_total, self.window_all = par.sum([float(step_loss), self.window_tokens])  # global: ranks decide alike
            loss = loss_total / max(n_loss, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.guard.bad(state.step + 1, loss, grad_norm):  # skipped: data moves on
            self.optimizer.zero_grad(set_to_none=True)
            state.epoch, state.batch, self.rng = micro[-1][0], micro[-1][1], par.gather_rng(rng_state())
            return StepStats(loss, grad_norm, lr, n_loss, skipped=True)
        stats = StepStats(loss, grad_norm, lr, n_loss)
        with self.applying():  # a step is applied and logged whole or not at all
            self.optimizer.step()
            self.scheduler.step()
            for hook in self.hooks:
                hook.after_optimizer_step(self)
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch, state.batch = micro[-1][0], micro[-1][1]
            state.tokens += n_loss
            self.rng = par.gather_rng(rng_state())
            self.result.losses.append(loss)
            self.log_step(stats)
        return stats

    def _accumulate_sft(self, micro: list[tuple[int, int, dict[str, torch.Tensor]]]
                        ) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Forward + backward of the SFT micro-batches: each summed loss scaled by 1 / (the step's global
        loss-token count). Returns (this rank's summed loss, the global loss-token count, no metrics)."""
        par, device = self.par, self.device
        n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, _, b in micro)
        n_loss = int(par.sum([n_local])[0])  # the global token count: the loss is the global token mean
        step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for k, (_, _, batch) in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with par.no_sync(self.engine, last=k == len(micro) - 1):
                with self.accelerator.autocast():
                    loss_sum, _ = self.engine(batch)
                (loss_sum * par.loss_scale(n_loss)).backward()
            step_loss += loss_sum.detach()
            self.window_tokens += int(batch["input_ids"].numel())
        return step_loss, n_loss, {}

    def log_step(self, stats: StepStats) -> None:
        """Every ``output.log_every`` steps (and the last): a metrics row and the progress bar."""
        cfg, state = self.cfg, self.state
        if state.step % cfg.output.log_every == 0 or state.step == cfg.train.max_steps:
            now = time.perf_counter()
            tok_s = self.window_all / max(now - self.window_t, 1e-9)
            row = {"step": state.step, "epoch": state.epoch, "loss": stats.loss, "lr": stats.lr,
                   "grad_norm": round(stats.grad_norm, 6), "tokens_per_s": round(tok_s, 1),
                   "mem_gb": round(memory_gb(self.device), 3), "tokens": state.tokens}
            row |= {k: round(v, 6) for k, v in self.step_metrics.items()}  # preference rewards, margins
            for hook in self.hooks:
                row |= hook.log_fields(self)
            self.metrics.write(row)
            if self.bar is not None:
                    self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                                     tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['mem_gb']:.2f}GB")
            self.window_tokens, self.window_t = 0, now
        if self.bar is not None:
            self.bar.update(1)

    # -- checkpoints and the loop -------------------------------------------------------------------

    def save_checkpoint(self, sync: bool = True) -> None:
        """Checkpoint the last completed step, unless saved already (rank 0 writes; its ``rng`` holds
        every rank's state after that step)."""
        if self.state.step != self.saved[0]:
            path = save_checkpoint(self.model, self.optimizer, self.scheduler, self.state, self.cfg,
                                   rng=self.rng) if self.par.is_main else None
            self.saved = self.state.step, path
            if sync:
                self.par.barrier()

    def _on_interrupt(self) -> None:
        self.bar.close()
        self.save_checkpoint(sync=False)  # no collective: the other ranks may be stopping anywhere
        log.warning("interrupted after step %d (%s); continue with resume=auto", self.state.step,
                    f"checkpoint {self.saved[1]}" if self.saved[1] else "nothing to resume from")

    def train(self, stop_after: int | None = None) -> TrainResult:
        """The loop: steps until ``train.max_steps`` (or ``stop_after`` steps in this invocation), hooks
        after each, checkpoints every ``train.save_every``; at the end the adapter in PEFT format."""
        cfg, par, state = self.cfg, self.par, self.state
        stream = micro_batches(self.train_ds, cfg, self.tokenizer, state.epoch, state.batch, rank=par.rank,
                               world=par.world)
        self.bar = progress_bar(cfg, state.step, enabled=par.is_main, desc=self.budget_label)
        self.window_tokens, self.window_t = 0, time.perf_counter()
        steps_this_run = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with Interrupts(self._on_interrupt) as interrupts:
            self.applying = interrupts.held
            while state.step < cfg.train.max_steps and (stop_after is None or steps_this_run < stop_after):
                if self.step([next(stream) for _ in range(cfg.train.grad_accum)]).skipped:
                    continue
                steps_this_run += 1
                for hook in self.hooks:
                    hook.after_step(self)
                if cfg.train.save_every and state.step % cfg.train.save_every == 0:
                    self.save_checkpoint()
            self.bar.close()
            self.save_checkpoint()
            if state.step >= cfg.train.max_steps:
                self.finish()
        self.applying = contextlib.nullcontext
        self.metrics.end()
        if par.is_main:
            clean_temporaries(self.out)
        self.result.step, self.result.tokens = state.step, state.tokens
        return self.result

    def finish(self) -> None:
        """After the last step: the final hooks (evals), a finite-weights check, the adapter saved."""
        for hook in self.hooks:
            hook.on_finish(self)
        check_finite_params(self.model, self.state.step)  # never a NaN adapter
        if self.par.is_main:
            with writing(self.out / "adapter"):
                self.result.adapter_dir = save_adapter(
                    self.model, self.out / "adapter", cfg=self.cfg.lora, base_model=self.cfg.model.name_or_path,
                    tokenizer=self.tokenizer, run_config=self.cfg, revision=self.cfg.model.revision)
            log.info("adapter saved to %s", self.result.adapter_dir)
        self.par.barrier()


def train(cfg: "Config", *, stop_after: int | None = None) -> TrainResult:
    """Run training as configured. ``stop_after`` ends this invocation after that many optimizer
    steps with a checkpoint (a planned pre-emption; ``resume: auto`` continues it). ``output_dir`` is
    locked for the run (rank 0; a second run there is refused)."""
    t0 = time.perf_counter()
    with output_lock(cfg.output_dir):
        recipe = Recipe(cfg)
        recipe.setup()
        if recipe.already_complete:
            return TrainResult(output_dir=recipe.out, adapter_dir=recipe.out / "adapter",
                               step=checkpoint_step(recipe.resume), resumed_from=recipe.resume,
                               already_complete=True)
        result = recipe.train(stop_after=stop_after)
    result.seconds = time.perf_counter() - t0
    return result
