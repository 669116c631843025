"""Predicted step time of a run: per-op breakdown, tokens/s, wall time, ours vs the HF stack.

``predict(arch, options, gpu)`` -> :class:`StepPrediction`; ``predict_for_config(cfg, gpu)`` maps a
run :class:`~qlora_trainer.config.Config` onto :class:`StepOptions` (the same fields the memory
estimate reads) and also predicts the HF stack's step on the same shape. These are predictions of
an analytic model (docs/speed-model.md), never measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlora_trainer.models.catalog import ArchSpec
from benchmarks.speed.devices import Device, Efficiency, get_device, op_seconds
from benchmarks.speed.ops import PHASES, Op
from benchmarks.speed.recipes import StepOptions, step_ops

# Stretches of a step without a host-device sync: forward, loss, recompute and backward are enqueued
# back to back (CUDA's launch queue absorbs GPU-heavy and host-heavy stretches alternating); the
# host then waits (grad norm / loss .item(), the paged optimizer's synchronize) before the optimizer.
SEGMENTS = (("forward", "loss", "recompute", "backward"), ("optimizer",))
COMPILED_PHASES = ("forward", "recompute", "backward")  # performance.compile: the decoder layers' ops
# Rows of the breakdown: op names grouped into what a reader wants to compare.
GROUPS = (("dequant", ("dequant",)), ("linear GEMMs", ("base",)), ("LoRA", ("lora.",)),
          ("attention", ("attention.",)), ("lm_head + loss", ("lm_head", "ce.", "loss")),
          ("norm/rope/swiglu", ("rmsnorm", "hf.rmsnorm", "rope", "hf.rope", "swiglu", "hf.silu")),
          ("optimizer", ("adamw", "clip_grad")))


@dataclass
class StepPrediction:
    """One step's predicted time. ``phases``: phase -> (gpu s, host s); ``ops``: op -> (gpu s,
    host s, launches) summed over its instances; ``seconds`` = sum over :data:`SEGMENTS` of
    max(gpu, host) of the segment's phases."""

    arch: str
    gpu: str
    options: StepOptions
    seconds: float
    phases: dict[str, tuple[float, float]]
    ops: dict[str, tuple[float, float, int]]
    flops: float
    bytes: float
    launches: int
    dequants: int
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        o = self.options
        return o.batch * o.seq_len * o.grad_accum

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def bound(self) -> str:
        """``gpu`` or ``host`` (launch/overhead bound): which side dominates the step."""
        gpu = sum(g for g, _ in self.phases.values())
        cpu = sum(h for _, h in self.phases.values())
        return "host (launch/overhead)" if cpu > gpu else "gpu"

    def groups(self) -> dict[str, float]:
        """GPU seconds per :data:`GROUPS` row (the rest under ``other``), plus ``host overhead``: the
        step time the host's launches add on top of the GPU work (phases where host > GPU)."""
        out: dict[str, float] = {g: 0.0 for g, _ in GROUPS} | {"other": 0.0}
        for name, (g, _, _) in self.ops.items():
            key = next((grp for grp, prefixes in GROUPS if name.startswith(prefixes)), "other")
            out[key] += g
        out["host overhead (exposed)"] = self.seconds - sum(g for g, _ in self.phases.values())
        return out

    def top_ops(self, n: int = 6) -> list[tuple[str, float]]:
        """The ``n`` op names with the most time (GPU or host, whichever is larger), seconds."""
        ranked = sorted(((k, max(g, h)) for k, (g, h, _) in self.ops.items()), key=lambda kv: -kv[1])
        return ranked[:n]

    def wall_seconds(self, steps: int) -> float:
        return steps * self.seconds

    def to_dict(self) -> dict:
        return {"arch": self.arch, "gpu": self.gpu, "system": self.options.system,
                "step_s": round(self.seconds, 5), "tokens_per_s": round(self.tokens_per_s, 1),
                "bound": self.bound, "tflop": round(self.flops / 1e12, 3), "gb_moved": round(self.bytes / 1e9, 2),
                "launches": self.launches, "dequants": self.dequants,
                "phases": {k: {"gpu_s": round(g, 5), "host_s": round(h, 5)} for k, (g, h) in self.phases.items()},
                "breakdown_s": {k: round(v, 5) for k, v in self.groups().items()},
                "top_ops_s": {k: round(v, 5) for k, v in self.top_ops()},
                "options": self.options.to_dict(), "notes": self.notes}


def predict_ops(ops: list[Op], dev: Device, eff: Efficiency, *, cuda_graphs: bool = False,
                system: str = "hf", compile: str = "none",
                ) -> tuple[float, dict[str, tuple[float, float]], dict[str, tuple[float, float, int]]]:
    """(step seconds, per-phase (gpu, host), per-op-name (gpu, host, launches)) of ``ops``;
    ``compile`` (``StepOptions.compile``) applies to the ops of :data:`COMPILED_PHASES`."""
    phases = {p: [0.0, 0.0] for p in PHASES}
    per_op: dict[str, list] = {}
    for op in ops:
        layer = compile != "none" and op.phase in COMPILED_PHASES
        g, h = op_seconds(op, dev, eff, cuda_graphs=cuda_graphs or (layer and compile == "reduce-overhead"),
                          system=system, compiled=layer and compile == "default")
        phases[op.phase][0] += g * op.count
        phases[op.phase][1] += h * op.count
        row = per_op.setdefault(op.name, [0.0, 0.0, 0])
        row[0] += g * op.count
        row[1] += h * op.count
        row[2] += op.launches * op.count
    seconds = sum(max(sum(phases[p][0] for p in seg), sum(phases[p][1] for p in seg)) for seg in SEGMENTS)
    return (seconds, {p: (g, h) for p, (g, h) in phases.items() if g or h},
            {k: (v[0], v[1], v[2]) for k, v in per_op.items()})


def predict(arch: ArchSpec, options: StepOptions, gpu: str | Device = "h100",
            eff: Efficiency | None = None) -> StepPrediction:
    """The predicted step of ``arch`` under ``options`` on ``gpu`` (efficiencies: the calibrated
    defaults of :func:`benchmarks.speed.calibrate.default_efficiency` unless given)."""
    from benchmarks.speed.calibrate import default_efficiency

    dev = gpu if isinstance(gpu, Device) else get_device(gpu)
    eff = eff or default_efficiency(dev.name)
    ops = step_ops(arch, options)
    seconds, phases, per_op = predict_ops(ops, dev, eff, cuda_graphs=options.cuda_graphs, system=options.system,
                                          compile=options.compile)
    notes = []
    if dev.name != "h100":
        notes.append(f"{dev.name}: datasheet peaks x the H100-fitted efficiencies (not calibrated on this GPU)")
    return StepPrediction(arch.name, dev.name, options, seconds, phases, per_op,
                          flops=sum(op.total_flops for op in ops), bytes=sum(op.total_bytes for op in ops),
                          launches=sum(op.total_launches for op in ops),
                          dequants=sum(op.count for op in ops if op.kind.startswith("dequant")), notes=notes)


def options_for_config(cfg, *, act_bytes: int = 2, budget_bytes: int | None = None) -> StepOptions:
    """Our trainer's :class:`StepOptions` for a run config (kernels ``auto`` = on for CUDA).
    ``budget_bytes``: the GPU's memory, for ``performance.checkpoint_layers: auto`` (the trainer's plan,
    ``memory/checkpoint_plan.py``; None = every layer checkpointed, as on a device of unknown size)."""
    from qlora_trainer.kernels.base_weight import CHUNK_BYTES
    from qlora_trainer.memory.checkpoint_plan import plan_checkpoint_layers
    from qlora_trainer.train.setup import grouped_projections_on

    t = cfg.lora.targets
    kernels, path = cfg.performance.kernels != "torch", cfg.performance.nf4_matmul
    # a fused/chunked member is not grouped (kernels/grouped_linear.py grouped_projections)
    grouped = grouped_projections_on(cfg, training=True) and (path == "dequant" or not kernels)
    return StepOptions(
        system="ours", batch=cfg.train.batch_size, seq_len=cfg.data.seq_len, grad_accum=cfg.train.grad_accum,
        lora_r=cfg.lora.r, targets=tuple(t) if isinstance(t, list) else t, dropout=cfg.lora.dropout,
        kernels=kernels, ckpt_every=1 if cfg.performance.gradient_checkpointing else 0,
        ckpt_layers=plan_checkpoint_layers(cfg, budget_bytes) if cfg.performance.gradient_checkpointing else None,
        mlp_chunk=cfg.performance.mlp_chunk_tokens, offload=cfg.performance.offload_activations,
        loss_chunk=cfg.performance.loss_chunk_size, optimizer=cfg.train.optimizer, act_bytes=act_bytes,
        blocksize=cfg.quantization.blocksize, double_quant=cfg.quantization.double_quant,
        clip_grad=cfg.train.max_grad_norm > 0,
        # performance.group_projections: one dequant launch and one base GEMM per q/k/v and gate/up group
        # (the per-member B, du and dB GEMMs modelled too), where the trainer's step runs it
        fused_qkv=grouped, fused_gate_up=grouped, fused_add_norm=cfg.performance.fused_add_norm, compile=cfg.performance.compile,
        # performance.nf4_matmul (kernels/base_weight.py BaseWeight.path; Triton kernels only)
        fused_dequant_gemm=kernels and path == "fused", nf4_chunk_bytes=CHUNK_BYTES if kernels and path == "chunked" else 0)


def hf_options(ours: StepOptions) -> StepOptions:
    """The HF stack on the same shape and batch (its recipe: all-linear LoRA, checkpointing)."""
    return replace(ours, system="hf", kernels=False, ckpt_every=1, ckpt_layers=None, mlp_chunk=0, offload=False,
                   fused_qkv=False, fused_gate_up=False, skip_down_recompute=False,
                   fused_dequant_gemm=False, cuda_graphs=False, clip_grad=ours.clip_grad, fused_add_norm=False,
                   compile="none", nf4_chunk_bytes=0)


def predict_for_config(cfg, gpu: str = "h100", budget_bytes: int | None = None
                       ) -> tuple[StepPrediction, StepPrediction] | None:
    """(ours, hf) predictions for a run config, or None when the model's shape is unknown without
    a download (same rule as the memory estimate). ``budget_bytes``: the device memory the
    checkpoint plan sees (default: ``gpu``'s table entry)."""
    from qlora_trainer.memory.estimate import resolve_arch

    arch, _ = resolve_arch(cfg.model.name_or_path)
    if arch is None:
        return None
    budget = budget_bytes if budget_bytes is not None else get_device(gpu).memory_bytes
    ours = options_for_config(cfg, budget_bytes=budget)
    return predict(arch, ours, gpu), predict(arch, hf_options(ours), gpu)


def _hms(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s" if h else f"{rem // 60}m{rem % 60:02d}s"


def markdown(ours: StepPrediction, hf: StepPrediction, *, steps: int, epoch_steps: int | None = None) -> str:
    """The estimate command's table: per-group seconds for both stacks, totals, ratio, wall time."""
    o = ours.options
    lines = [f"### predicted step time: {ours.arch} on {ours.gpu}, batch {o.batch} x seq {o.seq_len}"
             f" x grad_accum {o.grad_accum}", "", "| | ours (s) | HF stack (s) |", "|---|---:|---:|"]
    go, gh = ours.groups(), hf.groups()
    for k in go:
        lines.append(f"| {k} | {go[k]:.4f} | {gh[k]:.4f} |")
    lines += [f"| **step** | **{ours.seconds:.4f}** | **{hf.seconds:.4f}** |",
              f"| tokens/s | {ours.tokens_per_s:,.0f} | {hf.tokens_per_s:,.0f} |",
              f"| kernel launches / dequantizations | {ours.launches:,} / {ours.dequants:,} | "
              f"{hf.launches:,} / {hf.dequants:,} |",
              f"| bound | {ours.bound} | {hf.bound} |",
              f"| wall time, {steps} steps | {_hms(ours.wall_seconds(steps))} | {_hms(hf.wall_seconds(steps))} |"]
    if epoch_steps:
        lines.append(f"| wall time, one epoch ({epoch_steps} steps) | {_hms(ours.wall_seconds(epoch_steps))} | "
                     f"{_hms(hf.wall_seconds(epoch_steps))} |")
    for label, p in (("ours", ours), ("HF stack", hf)):
        lines.append(f"\n{label}, largest ops (GPU or host time, s): " +
                     ", ".join(f"{k} {v:.4f}" for k, v in p.top_ops()))
    lines += ["", f"predicted ours/HF speed ratio: **{hf.seconds / ours.seconds:.2f}x** "
              "(a model prediction, not a measurement; docs/speed-model.md)"]
    lines += [f"- {n}" for n in ours.notes]
    return "\n".join(lines)


__all__ = ["GROUPS", "StepPrediction", "hf_options", "markdown", "options_for_config", "predict",
           "predict_for_config", "predict_ops"]


class StepTimeCheck:
    """The trainer's start-of-run prediction and, after a few steps, the measured step time beside it.

    ``StepTimeCheck.start(cfg, device)`` logs the predicted step (this GPU's entry in the device
    table when its name matches one, else the H100) and returns the checker; ``tick()`` after every
    optimizer step logs the mean of steps 2..``1 + measure`` (the first step warms up) once."""

    def __init__(self, predicted_s: float | None, measure: int = 3) -> None:
        import time

        self.predicted_s, self.measure, self.n, self._clock = predicted_s, measure, 0, time.perf_counter
        self._t0 = self._clock()

    @classmethod
    def start(cls, cfg, device) -> "StepTimeCheck":
        import logging

        log = logging.getLogger("qlora_trainer.train.loop")
        try:
            from qlora_trainer.memory.checkpoint_plan import device_budget

            gpu = _device_table_name(device)
            pair = predict_for_config(cfg, gpu, device_budget(device)) if gpu else None
        except Exception as e:  # noqa: BLE001 - advisory only: training goes on without it
            log.info("step-time prediction unavailable: %s", e)
            pair = None
        if pair is None:
            return cls(None)
        ours, hf = pair
        log.info("predicted step on %s: %.3f s (%.0f tokens/s; HF stack %.3f s; a model, not a measurement)",
                 gpu, ours.seconds, ours.tokens_per_s, hf.seconds)
        return cls(ours.seconds)

    def tick(self) -> None:
        self.n += 1
        if self.n == 1:
            self._t0 = self._clock()
        elif self.n == 1 + self.measure and self.predicted_s is not None:
            import logging

            measured = (self._clock() - self._t0) / self.measure
            logging.getLogger("qlora_trainer.train.loop").info(
                "step time: measured %.3f s (mean of steps 2-%d) vs predicted %.3f s (%+.0f%%)", measured,
                self.n, self.predicted_s, 100 * (measured / self.predicted_s - 1))


def _device_table_name(device) -> str | None:
    """The device table's name for a CUDA device (by its marketing name), else None (CPU)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    from benchmarks.speed.devices import DEVICES

    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    return next((d for d in DEVICES if d in name), "h100")
