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

The GPU suite's ``moe-load`` part (:func:`synthetic_rows`) needs no download: it writes a synthetic
checkpoint with a real model's per-layer shapes but only a few decoder layers, measures both paths on
it, and adds the per-layer figures extrapolated to the real model's layer count (``extrapolated_*``).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def dense_bytes(model_dir: Path, dtype: torch.dtype) -> dict[str, int]:
    """Bytes in ``dtype`` of the model's fused experts (``experts_dense``: what the old path puts on the
    device) and of its parameters outside the decoder layers (``outside_layers``: embeddings, final
    norm, lm_head; kept in 16 bits by both paths)."""
    from transformers import AutoConfig

    from qlora_trainer.models.moe import EXPERT_PARAMS, experts_modules
    from qlora_trainer.models.moe_load import model_skeleton

    skeleton = model_skeleton(AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="eager")
    size = torch.empty(0, dtype=dtype).element_size()
    experts = sum(getattr(m, n).numel() for m in experts_modules(skeleton).values() for n in EXPERT_PARAMS)
    outside = sum(p.numel() for n, p in skeleton.named_parameters() if ".layers." not in f".{n}")
    return {"experts_dense": experts * size, "outside_layers": outside * size}


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
    return list(measure_each(model_dir, device=device, dtype=dtype))


def measure_each(model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """:func:`measure`'s rows, each as soon as its load is done."""
    measure_fn = cpu_peak if device.type == "cpu" else cuda_peak
    sizes = dense_bytes(model_dir, dtype)
    for path in PATHS:  # streamed first: the old path may not fit the device at all
        row = {"model": model_dir.name, "path": path, "device": str(device), "dtype": str(dtype), **sizes}
        t0 = time.time()
        try:
            r = measure_fn(lambda: load(model_dir, device=device, dtype=dtype, streamed=path == "streamed"))
            row |= {**r, "transient": r["peak"] - r["kept"], "status": "ok", "load_s": round(time.time() - t0, 1)}
        except torch.OutOfMemoryError as e:
            row |= {"peak": None, "kept": None, "transient": None, "status": f"out of memory: {str(e)[:120]}"}
        gc.collect()
        yield row


def tiny_checkpoints(root: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Tiny random Mixtral and Qwen3-MoE saved by ``save_pretrained`` under ``root``."""
    from qlora_trainer.models.families import family_config
    from qlora_trainer.models.tiny import model_from_config

    out = []
    for family in ("mixtral", "qwen3_moe"):
        model_from_config(family_config(family), dtype=dtype, seed=0).save_pretrained(root / family)
        out.append(root / family)
    return out


def synthetic_config(arch: str, layers: int, *, tiny: bool) -> Any:
    """The transformers config of the catalog model ``arch`` cut to ``layers`` decoder layers; ``tiny``:
    its family's tiny config (``models/families.py``) instead, for the CPU dry run."""
    from dataclasses import replace

    from qlora_trainer.models.catalog import get_arch
    from qlora_trainer.models.families import family_config

    spec = get_arch(arch)
    if not tiny:
        return replace(spec, layers=layers).to_hf_config()
    cfg = family_config(spec.family)
    cfg.num_hidden_layers = layers
    return cfg


def write_synthetic(cfg: Any, out: Path, *, dtype: torch.dtype, seed: int = 0, block: int = 1 << 22) -> Path:
    """``cfg``'s ``*ForCausalLM`` built on the CPU in ``dtype`` and saved by ``save_pretrained`` to ``out``.

    Its parameters are random N(0, 0.02) values: one seeded block of ``block`` values repeated through
    every tensor. Fresh random numbers for each of Mixtral's 3 G parameters per two layers cost ~50 s of
    one core (transformers' init ran at ~60 M values/s/core on the CPU box); the repeated block costs a
    memory copy, and the load paths' peaks do not depend on the values."""
    from qlora_trainer.models.moe_load import model_skeleton

    model = model_skeleton(cfg, dtype=dtype, attn_implementation="eager")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device="cpu")  # tied parameters stay one tensor
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(block, generator=gen) * 0.02).to(dtype)
    for p in model.parameters():
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), block):
            flat[i:i + block].copy_(base[:min(block, flat.numel() - i)])
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    model.save_pretrained(out)
    return out


def extrapolated(row: dict[str, Any], layers: int, full_layers: int) -> dict[str, Any]:
    """``row`` (a load of ``layers`` decoder layers) extrapolated to ``full_layers``: an estimate, not a
    measurement. What is kept and the 16-bit experts grow by their per-layer share (kept minus what lies
    outside the layers, over ``layers``); the streamed load's transient is one expert's dense weights
    at a time whatever the depth, so it stays; the old path's transient holds every layer's 16-bit
    experts at once, so it grows with the layers."""
    scale = full_layers / layers
    out = {"extrapolated_layers": full_layers, "per_layer_experts_dense": row["experts_dense"] // layers,
           "extrapolated_experts_dense": round(row["experts_dense"] * scale)}
    if row["status"] != "ok":
        return out
    per_layer_kept = round((row["kept"] - row["outside_layers"]) / layers)
    kept = row["outside_layers"] + per_layer_kept * full_layers
    transient = row["transient"] if row["path"] == "streamed" else round(row["transient"] * scale)
    return out | {"per_layer_kept": per_layer_kept, "extrapolated_kept": kept,
                  "extrapolated_transient": transient, "extrapolated_peak": kept + transient}


def synthetic_rows(arch: str, layers: int, work: Path, *, device: torch.device, dtype: torch.dtype,
                   tiny: bool = False, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Both load paths of a synthetic ``arch`` with ``layers`` decoder layers written under ``work``
    (removed after), each row, as soon as its load is done, with the write's seconds and the
    :func:`extrapolated` figures."""
    from qlora_trainer.models.catalog import get_arch

    out = work / f"{arch}-{layers}l"
    full = get_arch(arch).layers
    t0 = time.time()
    try:
        write_synthetic(synthetic_config(arch, layers, tiny=tiny), out, dtype=dtype, seed=seed)
        write_s = round(time.time() - t0, 1)
        for r in measure_each(out, device=device, dtype=dtype):
            yield {"kind": "moe_load", "arch": arch, "synthetic": "tiny shapes" if tiny else "real per-layer shapes",
                   "layers": layers, "checkpoint_write_s": write_s, **r, **extrapolated(r, layers, full)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


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
