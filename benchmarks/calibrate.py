"""Part 5 of the suite: the memory estimator against what was measured.

* :func:`cuda_context`: the CUDA context's size measured in this (fresh) process: device memory in use
  (``cudaMemGetInfo``) minus what the torch allocator holds, right after CUDA starts and again after
  cuBLAS, SDPA and a Triton kernel have run (their handles and module images are context too).
* :func:`compare_rows`: for every measured step row of parts 2-4, our estimate (``system`` ``ours``
  through ``estimate_for_config`` of the very config the row ran, or ``hf``) against the measured peak
  allocated and reserved bytes (GiB); ``within_5pct`` is the goal (estimate within ±5% of measured).
* :func:`memory_cli`: ``qlora-trainer memory MODEL --seq N --json [--measure]`` as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.spec import GIB, RunSpec
from benchmarks.stage import child_cwd, child_env

GOAL_RDIFF = 0.05


def cuda_context(device: str) -> dict:
    """Measured CUDA context (GiB) vs the estimator's assumption; ``skipped`` without CUDA."""
    import torch

    from qlora_trainer.memory.estimate import CUDA_CONTEXT

    assumed = CUDA_CONTEXT / GIB
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return {"status": "skipped", "reason": "no CUDA device", "assumed_gib": assumed}

    def outside_allocator() -> float:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return (total - free - torch.cuda.memory_reserved()) / GIB

    torch.zeros(1, device="cuda")
    at_init = outside_allocator()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    from qlora_trainer.kernels.rmsnorm import rms_norm

    rms_norm(a, torch.ones(4096, device="cuda", dtype=torch.bfloat16), 1e-5, backend="triton").sum().item()
    after = outside_allocator()
    return {"status": "ok", "at_init_gib": at_init, "after_kernels_gib": after, "assumed_gib": assumed,
            "rdiff_vs_assumed": (assumed - after) / after}


def estimate_row(row: dict):
    """Our estimator's ``MemoryEstimate`` for a step row (its spec rebuilt), or None for systems the
    estimator has no profile of (``hf-tuned``, ``unsloth``)."""
    from qlora_trainer.memory.estimate import estimate, estimate_for_config
    from qlora_trainer.models.catalog import get_arch

    spec = RunSpec(system=row["system"], model=row["model"], seq_len=row["seq_len"], batch=row["batch"],
                   device=row.get("device", "cuda"), dtype=row.get("dtype", "bfloat16"),
                   cap_gb=row.get("cap_gb"), extra=row.get("extra") or {})
    if spec.system == "qlora_trainer":
        from benchmarks.systems.ours import make_config
        from qlora_trainer.memory.checkpoint_plan import plan_checkpoint_layers

        cfg = make_config(spec)  # performance.checkpoint_layers=auto rows: planned for their cap, as the run did
        budget = int(spec.cap_gb * GIB) if spec.cap_gb else None
        return estimate_for_config(cfg, plan_checkpoint_layers(cfg, budget))
    if spec.system == "hf":
        return estimate(get_arch(spec.model), seq_len=spec.seq_len, batch=spec.batch, lora_r=spec.lora_r,
                        optimizer="paged_adamw_8bit" if spec.paged else "adamw", lora_dropout=0.0, system="hf")
    return None


def compare_rows(rows: list[dict]) -> list[dict]:
    """One ``calibration`` row per ok step row of ours / hf: estimate vs measured (GiB, rdiff =
    (estimate - measured) / measured; None where nothing was measured, e.g. on the CPU)."""
    out = []
    for r in rows:
        if r.get("kind", "step") not in ("step", "long_context") or r.get("status") != "ok":
            continue
        est = estimate_row(r)
        if est is None:
            continue
        c = {"kind": "calibration", "model": r["model"], "seq_len": r["seq_len"], "batch": r["batch"],
             "system": r["system"], "cap_gb": r.get("cap_gb"), "status": "ok",
             **({"extra": r["extra"]} if r.get("extra") else {}),
             "est_allocated_gib": est.allocated_bytes / GIB, "est_reserved_gib": est.reserved_bytes / GIB,
             "measured_allocated_gib": r.get("peak_allocated_gb"), "measured_reserved_gib": r.get("peak_reserved_gb")}
        for k in ("allocated", "reserved"):
            m = c[f"measured_{k}_gib"]
            c[f"rdiff_{k}"] = (c[f"est_{k}_gib"] - m) / m if m else None
        c["within_5pct"] = None if c["rdiff_allocated"] is None else abs(c["rdiff_allocated"]) <= GOAL_RDIFF
        out.append(c)
    return out


def memory_cli(model: str, seq: int, *, measure: bool, timeout: float) -> dict:
    """``python -m qlora_trainer.cli memory MODEL --seq SEQ --budget 80 --dropout 0 --json [--measure]``
    in its own process; its JSON (estimate and, with ``--measure``, the per-phase comparison)."""
    cmd = [sys.executable, "-m", "qlora_trainer.cli", "memory", model, "--seq", str(seq), "--budget", "80",
           "--dropout", "0", "--json"] + (["--measure"] if measure else [])
    try:
        proc = subprocess.run(cmd, cwd=child_cwd(), env=child_env(), capture_output=True, text=True,
                              timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "command": " ".join(cmd[1:])}
    base = {"command": " ".join(cmd[1:]), "model": model, "seq_len": seq, "measure": measure}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {**base, "status": "error", "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {**base, "status": "ok", "exit_code": proc.returncode, "estimate": out}
