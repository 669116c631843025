"""The timing loop and the process entry point every system adapter shares.

A system adapter provides ``build(spec) -> Built``; :func:`system_main` runs it in the current process
(one system per process), times ``spec.warmup + spec.steps`` optimizer steps on the one batch of
:func:`benchmarks.spec.make_batch`, and writes the row as JSON. stdlib + torch only (see spec.py).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.spec import GIB, RunSpec, base_row, make_batch

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3


@dataclass
class Built:
    """A system ready to train: ``loss_fn(batch) -> scalar loss`` (mean over predicted tokens, with
    grad), the optimizer over its trainable parameters, the vocabulary size and the parameter count."""

    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer
    vocab: int
    trainable_params: int


class Skip(Exception):
    """Raised by an adapter whose system cannot run here (e.g. Unsloth not installed)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(built: Built, spec: RunSpec, device: torch.device) -> dict:
    """Run warm-up + timed steps on one fixed batch; returns losses and per-step seconds.

    Step time is measured with CUDA events around forward + backward + optimizer step + zero_grad
    (perf_counter on the CPU). The step-0 loss is the first forward, before any update.
    """
    batch = make_batch(spec, built.vocab, device)
    losses, seconds = [], []
    for i in range(spec.warmup + spec.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss = built.loss_fn(batch)
        loss.backward()
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000.0
        else:
            dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= spec.warmup:
            seconds.append(dt)
    return {"losses": losses, "step_seconds": seconds}


def measure(build: Callable[[RunSpec], Built], spec: RunSpec) -> dict:
    """Build the system, time it, and return the result row (without the status fields)."""
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    if cuda:
        if spec.cap_gb is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.cap_gb * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    built = build(spec)
    _sync(device)
    load_s = time.perf_counter() - t0
    row: dict = {"load_s": round(load_s, 2), "trainable_params": built.trainable_params}
    if cuda:
        row["load_peak_gb"] = torch.cuda.max_memory_allocated(device) / GIB
        row["weights_gb"] = torch.cuda.memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    rss = {} if cuda else _reset_peak_rss()
    t = time_steps(built, spec, device)
    med = statistics.median(t["step_seconds"]) if t["step_seconds"] else float("nan")
    row.update(
        step0_loss=t["losses"][0], losses=t["losses"], step_seconds=t["step_seconds"],
        median_step_s=med, tokens_per_s=spec.batch * spec.seq_len / med,
        peak_allocated_gb=torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GIB if cuda else None,
    )
    if not cuda:
        row["weights_gb"] = None
        row.update(rss)
        row["peak_rss_gb"] = _proc_status_gb("VmHWM")
        if row["peak_rss_gb"] is not None and rss["rss_after_load_gb"] is not None:
            row["step_extra_rss_gb"] = row["peak_rss_gb"] - rss["rss_after_load_gb"]
    return row


def _proc_status_gb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from ``/proc/self/status`` in GB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> dict:
    """On the CPU: the resident set after loading, then the kernel's peak-RSS mark reset (Linux
    ``clear_refs`` 5), so ``VmHWM`` afterwards is the training steps' peak."""
    import gc

    gc.collect()
    rss = {"rss_after_load_gb": _proc_status_gb("VmRSS")}
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss


def system_main(name: str, build: Callable[[RunSpec], Built], argv: list[str] | None = None) -> int:
    """``python -m benchmarks.systems.<name> SPEC_JSON ROW_JSON``: run one spec, write one row.

    The row always gets written: ``status`` is ``ok``, ``skipped`` (with ``reason``), ``oom`` or
    ``error`` (with ``error``, the last line of the exception). Exit code 0 / 0 / 3 / 1.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"usage: python -m benchmarks.systems.{name} SPEC_JSON ROW_JSON", file=sys.stderr)
        return 2
    from benchmarks.stage import assert_not_shadowed

    assert_not_shadowed()
    spec = RunSpec.from_file(argv[0])
    base = {**base_row(spec), "system": name}
    code = EXIT_OK
    try:
        row = {**base, "status": "ok", **measure(build, spec)}
    except Skip as e:
        row = {**base, "status": "skipped", "reason": str(e)}
    except torch.OutOfMemoryError as e:
        row, code = {**base, "status": "oom", "error": str(e).splitlines()[0]}, EXIT_OOM
    except Exception as e:  # noqa: BLE001 - any failure of a peer system becomes a row, not a crash
        traceback.print_exc()
        row = {**base, "status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0],
               "traceback": traceback.format_exc()[-3000:]}
        code = EXIT_ERROR
    from qlora_trainer.io import atomic_write_text

    atomic_write_text(Path(argv[1]), json.dumps(row, indent=1))
    return code


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def bnb_paged_adamw_8bit(params: list[torch.nn.Parameter], spec: RunSpec) -> torch.optim.Optimizer:
    """The optimizer under test: bitsandbytes paged AdamW 8-bit on CUDA; torch AdamW on the CPU smoke."""
    if spec.paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=spec.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)


def built_from_peft_model(model: torch.nn.Module, spec: RunSpec) -> Built:
    """A PEFT-wrapped HF model (the HF stack, Unsloth): loss from its own forward, paged AdamW 8-bit."""
    model.train()
    params = trainable(model)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    return Built(loss_fn=loss_fn, optimizer=bnb_paged_adamw_8bit(params, spec),
                 vocab=model.config.vocab_size, trainable_params=sum(p.numel() for p in params))
