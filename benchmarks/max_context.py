"""Max context: the largest seq_len (to 1,024 tokens) at which one training step (forward, backward,
optimizer step; batch 1) completes under a GPU memory cap set with
``torch.cuda.set_per_process_memory_fraction``. Binary search; every probe is its own process.

    python -m benchmarks.max_context                         # the default grid below
    python -m benchmarks.max_context --models llama-3-8b --caps 24 --systems qlora_trainer

A cap above the card's memory is clamped to the card (80 GB on an 80 GB H100 = the whole card).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.spec import RunSpec
from benchmarks.systems import SYSTEMS

STEP = 1024
GRID: dict[str, tuple[float, ...]] = {"llama-3-8b": (24, 48, 80), "llama-2-70b": (48, 80), "llama-3-70b": (48, 80)}
OOM_MARKERS = ("out of memory", "alloc_failed", "cublas_status_alloc", "cudaerrormemoryallocation")


def search_max(fits: Callable[[int], bool | None], max_k: int) -> tuple[int, list[dict]]:
    """Largest ``k`` in 1..max_k with ``fits(k * STEP)`` true, assuming monotonicity; 0 if none.

    ``fits`` returns True (step completed), False (out of memory) or None (the system cannot run:
    the search stops and returns -1). Returns (max_seq_len, probes as ``{"seq_len", "fits"}``).
    """
    lo, hi, probes = 0, max_k + 1, []  # invariant: lo fits (0 trivially), hi does not (or past the range)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = fits(mid * STEP)
        probes.append({"seq_len": mid * STEP, "fits": ok})
        if ok is None:
            return -1, probes
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo * STEP, probes


def is_oom(row: dict) -> bool:
    return row["status"] == "oom" or (row["status"] == "error" and
                                      any(m in row.get("error", "").lower() for m in OOM_MARKERS))


def probe_fn(spec: RunSpec, work: Path, timeout: float, log: list[dict],
             extra_path: str | None = None) -> Callable[[int], bool | None]:
    """A ``fits(seq_len)`` that runs one step of ``spec`` at ``seq_len`` in a fresh process."""
    from dataclasses import replace

    from benchmarks.run import launch

    def fits(seq_len: int) -> bool | None:
        row = launch(replace(spec, seq_len=seq_len), work, timeout=timeout, extra_path=extra_path)
        log.append(row)
        print(f"[max-context] {spec.model} {spec.system} cap {spec.cap_gb} GB seq {seq_len}: {row['status']}",
              flush=True)
        if row["status"] == "ok":
            return True
        return False if is_oom(row) else None

    return fits


def main(argv: list[str] | None = None) -> int:
    import datetime as dt

    from benchmarks.results import device_info, write_results
    from benchmarks.run import prepare_weights, unsloth_available
    from benchmarks.systems import UNSLOTH_MISSING

    ap = argparse.ArgumentParser(prog="python -m benchmarks.max_context", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(GRID))
    ap.add_argument("--caps", nargs="+", type=float, default=None, help="GB caps (default: the grid per model)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--max-seq-len", type=int, default=131072, help="upper end of the search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--ckpt-root", default=str(Path(tempfile.gettempdir()) / "qlora-bench-ckpt"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per probe process")
    ap.add_argument("--unsloth-path", default=None, help="unpacked Unsloth wheels (unsloth process only)")
    a = ap.parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        print("error: max-context search needs a CUDA GPU (memory caps are CUDA-only)", file=sys.stderr)
        return 2
    stamp = device_info("python -m benchmarks.max_context " + shlex.join(sys.argv[1:] if argv is None else argv))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qlora-maxctx-") as work:
        for model in a.models:
            mode, ckpt = prepare_weights(model, Path(a.ckpt_root), a.seed, timeout=a.timeout)
            for cap in a.caps or GRID.get(model, (24.0,)):
                for system in a.systems:
                    spec = RunSpec(system=system, model=model, seq_len=STEP, batch=1, warmup=0, steps=1,
                                   seed=a.seed, weights=mode, checkpoint_dir=ckpt, cap_gb=cap)
                    base = {"kind": "max_context", "model": model, "system": system, "cap_gb": cap}
                    if system == "unsloth" and not unsloth_available(a.unsloth_path):
                        rows.append({**base, "max_seq_len": -1, "probes": [], "status": "skipped",
                                     "reason": UNSLOTH_MISSING})
                        continue
                    log: list[dict] = []
                    extra = a.unsloth_path if system == "unsloth" else None
                    best, probes = search_max(probe_fn(spec, Path(work), a.timeout, log, extra), a.max_seq_len // STEP)
                    row = {**base, "max_seq_len": best, "probes": probes,
                           "status": "ok" if best >= 0 else log[-1]["status"]}
                    if best < 0:
                        row["reason"] = log[-1].get("reason") or log[-1].get("error")
                    rows.append(row)
            if ckpt:
                shutil.rmtree(ckpt, ignore_errors=True)
    name = a.name or "max-context-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths = write_results(a.out, rows, stem=name, device=stamp, make_charts=False)
    print(Path(paths["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
