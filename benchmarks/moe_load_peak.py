"""Peak memory of loading a mixture-of-experts checkpoint in NF4: streamed (quantized while loading,
``models/moe_load.py``) against the old path (transformers + bitsandbytes, the fused experts loaded
in 16 bits onto the device and quantized afterwards by ``models.moe.quantize_experts``).

Per load: ``peak`` (the most bytes allocated at once during the load), ``kept`` (bytes still
allocated when it returns: the NF4 model), ``transient = peak - kept``, beside the experts' dense
size. On CUDA the numbers are ``torch.cuda.max_memory_allocated`` / ``memory_allocated`` above the
baseline. ``--dry-run`` runs on the CPU: the peak of live CPU allocations recorded by
``torch.profiler`` (``profile_memory``), in allocation order; without ``--model-dir`` it first writes
tiny Mixtral and Qwen3-MoE checkpoints (``models/families.py``) to a temporary directory.

Run: ``python -m benchmarks.moe_load_peak --model-dir DIR [--dtype bfloat16] [--dry-run] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PATHS = ("streamed", "old")


def load(model_dir: Path, *, device: torch.device, dtype: torch.dtype, streamed: bool) -> Any:
    """The NF4 base model of ``model_dir`` as training loads it (``streamed=False``: the old path)."""
    from qlora_trainer.config import config_from_dict
    from qlora_trainer.models.load import load_base_model

    cfg = config_from_dict({"model": {"name_or_path": str(model_dir)}})
    return load_base_model(cfg, device=device, dtype=dtype, stream_experts=streamed)


def experts_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes of the model's fused experts in ``dtype`` (what the old path puts on the device)."""
    from transformers import AutoConfig

    from qlora_trainer.models.moe import EXPERT_PARAMS, experts_modules
    from qlora_trainer.models.moe_load import model_skeleton

    skeleton = model_skeleton(AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="eager")
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(getattr(m, n).numel() * size for m in experts_modules(skeleton).values() for n in EXPERT_PARAMS)


def cpu_peak(fn: Callable[[], Any]) -> dict[str, int]:
    """Peak and final live bytes of the CPU allocations ``fn`` makes (torch.profiler memory events,
    replayed in time order; what ``fn`` returns is kept alive until they are counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    del kept
    return {"peak": peak, "kept": live}


def cuda_peak(fn: Callable[[], Any]) -> dict[str, int]:
    """``torch.cuda.max_memory_allocated`` / ``memory_allocated`` during / after ``fn``, above the baseline."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kept = fn()
    torch.cuda.synchronize()
    out = {"peak": torch.cuda.max_memory_allocated() - base, "kept": torch.cuda.memory_allocated() - base}
    del kept
    return out


def measure(model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One row per load path of ``model_dir``."""
    measure_fn = cpu_peak if device.type == "cpu" else cuda_peak
    experts = experts_bytes(model_dir, dtype)
    rows = []
    for path in PATHS:  # streamed first: the old path may not fit the device at all
        row = {"model": model_dir.name, "path": path, "device": str(device), "dtype": str(dtype),
               "experts_dense": experts}
        try:
            r = measure_fn(lambda: load(model_dir, device=device, dtype=dtype, streamed=path == "streamed"))
            row |= {**r, "transient": r["peak"] - r["kept"], "status": "ok"}
        except torch.OutOfMemoryError as e:
            row |= {"peak": None, "kept": None, "transient": None, "status": f"out of memory: {str(e)[:120]}"}
        rows.append(row)
        gc.collect()
    return rows


def tiny_checkpoints(root: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Tiny random Mixtral and Qwen3-MoE saved by ``save_pretrained`` under ``root``."""
    from qlora_trainer.models.families import family_config
    from qlora_trainer.models.tiny import model_from_config

    out = []
    for family in ("mixtral", "qwen3_moe"):
        model_from_config(family_config(family), dtype=dtype, seed=0).save_pretrained(root / family)
        out.append(root / family)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | path | peak | kept | transient | experts (dtype) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['path']} | {r['status']} | | | {r['experts_dense']:,} |")
            continue
        lines.append(f"| {r['model']} | {r['path']} | {r['peak']:,} | {r['kept']:,} | {r['transient']:,} "
                     f"| {r['experts_dense']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, action="append", help="a local MoE model directory (repeatable)")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU by default")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU (profiler), tiny models if no --model-dir")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run to measure on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.dry_run else torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = args.model_dir or (tiny_checkpoints(Path(tmp)) if args.dry_run else [])
        if not dirs:
            ap.error("--model-dir is required without --dry-run")
        rows = [r for d in dirs for r in measure(d, device=device, dtype=dtype)]
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
