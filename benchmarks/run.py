"""Benchmark runner: every system on every (model, seq_len), each run in its own process, then ratios
vs hf and vs unsloth, the step-0 loss check, and JSON + markdown + charts under ``--out``.

    python -m benchmarks.run --smoke --out /tmp/bench            # CPU: tiny model, 2 steps, < 1 min
    python -m benchmarks.run --models llama-3-8b --seq-lens 2048  # GPU

Exit code: 0, or 1 when a system errored or step-0 losses disagree beyond tolerance, 2 on bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.spec import CHECKPOINT_MAX_PARAMS_B, MODELS, RunSpec, base_row
from benchmarks.stage import REPO, child_cwd, child_env, run_boxed
from benchmarks.systems import MODULES, SYSTEMS, UNSLOTH_MISSING

def params_billion(model: str) -> float:
    """Parameter count of a catalog arch in billions (linear layers + embeddings + lm_head)."""
    from qlora_trainer.models.catalog import get_arch, param_counts

    c = param_counts(get_arch(model))
    return (c["linear"] + c["embed"] + c["lm_head"]) / 1e9


def launch(spec: RunSpec, work: Path, *, timeout: float, smoke: bool = False, extra_path: str | None = None,
           quiet: bool | None = None) -> dict:
    """Run one system on one spec in a fresh process (cwd and PYTHONPATH from :mod:`benchmarks.stage`:
    never the repo root); return its row (a ``timeout`` / ``error`` row if the process died without
    writing one, e.g. killed by the timeout or a CUDA abort). ``smoke``: one thread; ``quiet`` (default
    ``smoke``): its output discarded. ``extra_path``: first on its PYTHONPATH (Unsloth's wheels)."""
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.system}-{spec.model}-{spec.seq_len}-{spec.batch}-{spec.cap_gb}"
    if spec.extra:  # variants of one system on one shape get files of their own
        import hashlib

        tag += "-" + hashlib.sha1(json.dumps(spec.extra, sort_keys=True).encode()).hexdigest()[:8]
    spec_path, row_path = work / f"{tag}.spec.json", work / f"{tag}.row.json"
    spec_path.write_text(spec.to_json())
    row_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", MODULES[spec.system], str(spec_path), str(row_path)]
    out = subprocess.DEVNULL if (smoke if quiet is None else quiet) else None
    rc = run_boxed(cmd, timeout=timeout, cwd=child_cwd(), env=child_env(extra_path, smoke=smoke), stdout=out, stderr=out)
    if rc is None:
        return {**base_row(spec), "status": "timeout", "error": f"killed after its {timeout:.0f} s time box"}
    if row_path.is_file():
        return json.loads(row_path.read_text())
    return {**base_row(spec), "status": "error", "error": f"process ended ({rc}) without a result row"}


def unsloth_available(extra_path: str | None) -> bool:
    """Unsloth importable in its process: unpacked under ``extra_path`` or installed here."""
    if extra_path:
        return (Path(extra_path) / "unsloth").is_dir()
    return importlib.util.find_spec("unsloth") is not None


def prepare_weights(model: str, ckpt_root: Path, seed: int, *, timeout: float,
                    smoke: bool = False) -> tuple[str, str | None]:
    """(weights mode, checkpoint dir): a bf16 checkpoint written in its own process for models that
    fit the disk, else ``in_process`` (identical tensors generated inside each system's process)."""
    if params_billion(model) > CHECKPOINT_MAX_PARAMS_B:
        return "in_process", None
    path = ckpt_root / f"{model}-seed{seed}"
    subprocess.run([sys.executable, "-m", "benchmarks.weights", model, str(path), "--seed", str(seed)],
                   cwd=child_cwd(), env=child_env(smoke=smoke), timeout=timeout, check=True,
                   stdout=subprocess.DEVNULL if smoke else None)
    return "checkpoint", str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke: tiny model, fp32, seq 64, batch 2, 2 steps")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="catalog names (default: all five)")
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (W)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (M); the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="results directory (default: benchmarks/results; the smoke run: a temp directory)")
    ap.add_argument("--name", default=None, help="file stem (default: bench-<UTC date-time>)")
    ap.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "qlora-bench-ckpt"),
                    help="where random checkpoints are written (needs ~2 bytes/param free)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="do not delete checkpoints after each model")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per system process")
    ap.add_argument("--unsloth-path", default=None,
                    help="directory of unpacked Unsloth wheels, put on PYTHONPATH of the unsloth process only")
    ap.add_argument("--no-charts", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:  # overrides the grid: the CPU smoke run never writes into benchmarks/results
        # tiny-64: a shape bitsandbytes' own CPU dequantize gets right, so hf and ours agree exactly
        a.models, a.seq_lens, a.batch, a.warmup, a.steps = ["tiny-64"], [64], 2, 1, 1
        a.out = a.out or os.path.join(tempfile.gettempdir(), "qlora-bench-smoke")
    a.out = a.out or str(REPO / "benchmarks" / "results")
    return a


def main(argv: list[str] | None = None) -> int:
    import datetime as dt

    from benchmarks.results import device_info, disagreements, write_results
    from qlora_trainer.errors import QloraError

    a = parse_args(argv)
    device, dtype = ("cpu", "float32") if a.smoke else ("cuda", "bfloat16")
    try:
        for m in a.models:
            params_billion(m)
    except QloraError as e:
        print(f"error: --models: {e}", file=sys.stderr)
        return 2
    if device == "cuda" and shutil.which("nvidia-smi") is None:
        print("error: no CUDA GPU here; use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    stamp = device_info("python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv))
    ckpt_root = Path(a.ckpt_root)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as work:
        for model in a.models:
            try:
                mode, ckpt, failed = *prepare_weights(model, ckpt_root, a.seed, timeout=a.timeout, smoke=a.smoke), None
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                mode, ckpt, failed = "checkpoint", None, f"writing the random checkpoint failed: {e}"
            for seq_len in a.seq_lens:
                for system in a.systems:
                    spec = RunSpec(system=system, model=model, seq_len=seq_len, batch=a.batch, warmup=a.warmup,
                                   steps=a.steps, seed=a.seed, device=device, dtype=dtype, weights=mode,
                                   checkpoint_dir=ckpt)
                    if failed:
                        row = {**base_row(spec), "status": "error", "error": failed}
                    elif system == "unsloth" and not unsloth_available(a.unsloth_path):
                        row = {**base_row(spec), "status": "skipped", "reason": UNSLOTH_MISSING}
                    else:
                        row = launch(spec, Path(work), timeout=a.timeout, smoke=a.smoke,
                                     extra_path=a.unsloth_path if system == "unsloth" else None)
                    rows.append(row)
                    print(f"[bench] {model} seq {seq_len} {system}: {row['status']} "
                          f"{row.get('tokens_per_s', row.get('reason') or row.get('error', ''))}", flush=True)
            if ckpt and not a.keep_checkpoints:
                shutil.rmtree(ckpt, ignore_errors=True)
    name = a.name or "bench-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths = write_results(a.out, rows, stem=name, device=stamp, make_charts=not a.no_charts)
    print(Path(paths["markdown"]).read_text())
    bad = disagreements(rows)
    errors = [r for r in rows if r["status"] == "error"]
    for r in bad:
        print(f"[bench] STEP-0 LOSS DISAGREEMENT: {r['model']} seq {r['seq_len']} {r['system']} "
              f"{r['step0_loss']:.5f} vs {r['step0_loss_ref']} (rel diff {r['step0_loss_rdiff']:.2e})", file=sys.stderr)
    return 1 if bad or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
