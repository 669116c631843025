"""The suite's parts, each run as ``python -m benchmarks.parts PART CTX_JSON ROWS_JSONL`` in its own
process by :mod:`benchmarks.suite`. A part appends every result row (tagged with its part) to
``ROWS_JSONL`` the moment it has it (one JSON object a line, in the output folder), so a part killed
by its time box, or a whole call cut short, still leaves its finished rows.

``ctx`` (written by the suite): ``dry_run``, ``device``, ``dtype``, ``deadline`` (epoch seconds when the
part's box ends), ``work`` (scratch directory), ``out`` (the output folder: junit reports),
``peers`` (unpacked Unsloth wheels or None), ``results`` (the suite JSON so far), ``seed``.
The grids below are the GPU shapes; ``DRY`` replaces them with tiny ones on the CPU, same code paths.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.spec import RunSpec
from benchmarks.stage import INTERRUPT_GRACE_S, REPO, child_cwd, child_env, run_boxed

# Part speed: (model, seq_len) shapes; systems in order of value.
SPEED_SHAPES = [("llama-3-8b", 2048), ("llama-2-7b", 512)]
SPEED_SYSTEMS = ("qlora_trainer", "hf", "hf-tuned")
# Part variants: ours (RunSpec.extra, cap GB): what performance.checkpoint_layers=auto does on a 24 GB card.
SPEED_VARIANTS = [({"performance": {"checkpoint_layers": "auto"}}, 24.0)]
# Part compile (GPU only): ours with performance.compile (CUDA graphs), 7B/512 first (the launch-bound shape):
# (model, seq_len, RunSpec.extra). Not in the dry run: compiling even the tiny layer outlasts its box.
COMPILE_ROWS = [("llama-2-7b", 512, {"performance": {"compile": "reduce-overhead"}}),
                ("llama-3-8b", 2048, {"performance": {"compile": "reduce-overhead"}})]
# Part 3: 70B rows (in-process NF4 build, layer by layer).
BIG_ROWS = [("qlora_trainer", "llama-3-70b", 512), ("qlora_trainer", "llama-3-70b", 2048), ("hf", "llama-3-70b", 512)]
# Part 4: (model, goal seq_len, cap GB): pass/fail at the goal, ours with MLP tiling, CPU embeddings, offload.
LONG_GOALS = [("llama-3.1-70b", 32768, 48.0), ("llama-3.1-8b", 131072, 24.0)]
LONG_MODEL = {"mlp_chunk_tokens": 4096, "embeddings_on_cpu": True, "offload_activations": True}
# Seconds one row process may take at most (a hung row must not eat its whole part).
ROW_CAP_S = {"speed": 90.0, "unsloth": 150.0, "big": 100.0, "long": 150.0, "compile": 90.0}
# Unsloth needs its checkpoint written (16 GB for 8B) before its row: with less left it is skipped.
UNSLOTH_NEED_S = 150.0
# Part correctness, in order: (step, share of the part's box; what a step leaves goes to the next). bf16 kernel
# tests first (what runs), then one training step kernels on vs off, then the rest (fp32: one tile
# config each), then the gpu-marked tests outside tests/kernels, so none meets CUDA inside a timed row.
CORRECTNESS = [("kernels-bf16", 0.35), ("kernel_step", 0.25), ("kernels-rest", 0.25), ("gpu-tests", 0.15)]
GPU_TESTS = ["tests/models/test_cpu_embedding.py", "tests/models/test_checkpointing.py", "tests/models/test_compile.py",
             "tests/memory/test_cli.py", "tests/memory/test_profile.py"]
# (paths, -m, -k) per pytest step: on the GPU, then in the dry run (the interpreter is slow: one
# parametrisation per kernel family is the plumbing check)
PYTEST = {"kernels-bf16": (["tests/kernels"], "gpu and not slow", "bfloat16"),
          "kernels-rest": (["tests/kernels"], "gpu and not slow", "not bfloat16"),
          "gpu-tests": (GPU_TESTS, "gpu and not slow", None)}
PYTEST_DRY = {"kernels-bf16": (["tests/kernels"], "not gpu and not slow", "dequant_matches"),
              "kernels-rest": (["tests/kernels"], "not gpu and not slow",
                               "(loss_and_grads and float32 and triton) or (rmsnorm_forward and shape0 and float32)"),
              "gpu-tests": (["tests/models/test_cpu_embedding.py"], "not gpu and not slow", "idempotent")}
# Part moe-load: (catalog MoE, decoder layers written): a synthetic checkpoint with the model's real per-layer
# shapes (bf16, random), loaded streamed and the old way; the per-layer figures extrapolated to its full depth.
# Seconds on the GPU box, reasoned from the CPU box (one loaded core): the part process's imports ~5-10 s;
# writing (fill + save_pretrained) ran at 0.6-0.7 GB/s for Mixtral/Qwen3 shapes scaled to 0.5-0.9 GB, so
# Mixtral's 2 layers (6.3 GB: 5.6 GB of experts, 0.5 GB of embeddings + lm_head, 0.2 GB of attention) take
# <= 10 s and Qwen3's (3.7 GB) <= 6 s; each load reads the checkpoint from the page cache and quantizes on
# the GPU, ~5-10 s. Mixtral ~30 s, Qwen3 ~20 s: 80 s planned; Qwen3 only with MOE_LOAD_NEED_S left.
MOE_LOAD = [("mixtral-8x7b", 2), ("qwen3-30b-a3b", 2)]
MOE_LOAD_NEED_S = 30.0
STEPS = {"speed": (2, 5), "big": (1, 3), "long": (0, 1)}  # (warm-up, timed)

# The dry run (CPU, fp32, kernels under the interpreter): one tiny shape per part, every code path.
# tiny-64: every in_features a multiple of 64, where bitsandbytes' CPU dequantize (the HF stack's) is right.
DRY = {"speed_shapes": [("tiny-64", 64)], "big_rows": [("qlora_trainer", "tiny-64", 32), ("hf", "tiny-64", 32)],
       "long_goals": [("tiny-64", 256, 1.0)], "long_model": {"mlp_chunk_tokens": 64}, "steps": (0, 1)}


class Part:
    """What one part process knows: its context, its time left, and where its rows go."""

    def __init__(self, ctx: dict, rows_path: Path, name: str = "") -> None:
        self.ctx, self.rows_path, self.name = ctx, rows_path, name
        self.dry = bool(ctx["dry_run"])
        self.work = Path(ctx["work"])
        self.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.ctx["deadline"] - time.time()

    def emit(self, row: dict) -> dict:
        row = {**row, "part": self.name}
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[suite] {json.dumps({k: v for k, v in row.items() if k not in ('losses', 'step_seconds', 'probes')})}",
              flush=True)
        return row

    def spec(self, system: str, model: str, seq_len: int, kind: str, **kw) -> RunSpec:
        warmup, steps = DRY["steps"] if self.dry else STEPS[kind]
        return RunSpec(system=system, model=model, seq_len=seq_len, batch=1, warmup=warmup, steps=steps,
                       seed=self.ctx["seed"], device=self.ctx["device"], dtype=self.ctx["dtype"],
                       weights="in_process", **kw)

    def launch(self, spec: RunSpec, cap: float, **kw) -> dict:
        """One row in its own process, inside min(cap, time left); a row with no time left is ``skipped``."""
        from benchmarks.run import launch
        from benchmarks.spec import base_row

        box = min(cap, self.left() - 2.0)
        if box < 5.0:
            return {**base_row(spec), "status": "skipped", "reason": "no time left in the part's box"}
        return with_estimate(launch(spec, self.work, timeout=box, smoke=self.dry, quiet=False, **kw))


def with_estimate(row: dict) -> dict:
    """A measured row of ours / hf with our memory estimate beside its peak (GiB; ``est_*``)."""
    if row.get("status") != "ok" or row.get("system") not in ("qlora_trainer", "hf"):
        return row
    try:
        from benchmarks.calibrate import estimate_row
        from benchmarks.spec import GIB

        est = estimate_row(row)
    except Exception as e:  # noqa: BLE001 - an estimator failure must not lose the measured row
        return {**row, "estimate_error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    return row if est is None else {**row, "est_allocated_gib": est.allocated_bytes / GIB,
                                    "est_reserved_gib": est.reserved_bytes / GIB}


def part_correctness(p: Part) -> None:
    """:data:`CORRECTNESS` in order, each in its own boxed process: pytest steps (``gpu``-marked CUDA
    parametrisations on a GPU; CPU tests under the interpreter in a dry run) write a junit report into
    the output folder and get SIGINT when their box ends (so the report holds every finished test);
    ``kernel_step`` is one training step with kernels on vs off."""
    total = p.left()
    for i, (step, _) in enumerate(CORRECTNESS):
        box = p.left() - 2.0 - total * sum(share for _, share in CORRECTNESS[i + 1:])
        if box < 5.0:
            p.emit({"kind": "kernel_step" if step == "kernel_step" else "kernel_tests", "selection": step,
                    "status": "skipped", "reason": "no time left in the part's box"})
            continue
        # a pytest gets SIGINT at the end of its box and the grace period after it to write its report
        p.emit(kernel_step_row(p, box) if step == "kernel_step" else pytest_row(p, step, box - INTERRUPT_GRACE_S))


def pytest_row(p: Part, step: str, box: float) -> dict:
    """One pytest run (:data:`PYTEST`) inside ``box`` seconds, SIGINT at its end: counts and failures
    from its junit report (``junit-STEP.xml`` in the output folder; its log, ``-v -rfE``, in suite.log)."""
    paths, marks, select = (PYTEST_DRY if p.dry else PYTEST)[step]
    junit = Path(p.ctx.get("out") or p.work) / f"junit-{step}.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *[str(REPO / x) for x in paths], "-v", "-rfE", "-p", "no:cacheprovider",
           "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), "-m", marks, f"--junitxml={junit}"]
    if select:
        cmd += ["-k", select]
    if not p.dry and step.startswith("kernels") and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "6"]  # Triton compiles each kernel once per process
    env = child_env(smoke=p.dry)
    env["TRITON_INTERPRET"] = "1" if p.dry else "0"
    t0 = time.time()
    rc = run_boxed(cmd, timeout=box, own_group=True, interrupt_first=True, cwd=child_cwd(), env=env)
    status = ("timeout" if rc is None else "ok" if rc == 0 else "failed" if rc == 1 else "no tests" if rc == 5
              else f"exit {rc}")
    return {"kind": "kernel_tests" if step.startswith("kernels") else "gpu_tests", "selection": step, "status": status,
            "command": " ".join(cmd[1:]), "duration_s": round(time.time() - t0, 1), **junit_summary(junit)}


def kernel_step_row(p: Part, box: float) -> dict:
    """``python -m benchmarks.kernel_step`` in its own process inside ``box`` seconds."""
    out = p.work / "kernel_step.row.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.kernel_step", p.ctx["device"], p.ctx["dtype"], str(p.ctx["seed"]), str(out)]
    env = child_env(smoke=p.dry)
    env["TRITON_INTERPRET"] = "1" if p.dry else "0"
    t0 = time.time()
    rc = run_boxed(cmd, timeout=box, own_group=True, cwd=child_cwd(), env=env)
    took = {"duration_s": round(time.time() - t0, 1)}
    if out.is_file():
        return {**json.loads(out.read_text()), **took}
    return {"kind": "kernel_step", "status": "timeout" if rc is None else "error", "device": p.ctx["device"],
            "checks": {}, "error": f"killed after its {box:.0f} s box" if rc is None else f"exit {rc} without a row",
            **took}


def junit_summary(path: Path) -> dict:
    """Counts and the failed test ids (with the first line of each message) from a junit XML file."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"tests": 0, "failures": [], "note": "pytest wrote no report"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "errors", "skipped")}
    counts["failed"] = int(suite.get("failures", 0))
    failures = []
    for case in suite.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            msg = (bad.get("message") or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures": failures[:40]}


def part_moe_load(p: Part) -> None:
    """Peak memory of loading an MoE checkpoint in NF4, streamed vs the old path
    (``benchmarks/moe_load_peak.py``), on synthetic checkpoints of :data:`MOE_LOAD` written into the
    part's scratch folder (tiny shapes in the dry run, same code); the old path's OOM is its row's status."""
    import torch

    from benchmarks.moe_load_peak import synthetic_rows

    for i, (arch, layers) in enumerate(MOE_LOAD):
        if i and p.left() < (5.0 if p.dry else MOE_LOAD_NEED_S):
            p.emit({"kind": "moe_load", "arch": arch, "layers": layers, "status": "skipped",
                    "reason": f"not enough time left ({p.left():.0f} s of the {MOE_LOAD_NEED_S:.0f} s a row takes)"})
            continue
        try:  # each row as soon as its load is done: a part cut by its box keeps the streamed row
            for row in synthetic_rows(arch, layers, p.work, device=torch.device(p.ctx["device"]),
                                      dtype=getattr(torch, p.ctx["dtype"]), tiny=p.dry, seed=p.ctx["seed"]):
                p.emit(row)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the next one's rows
            p.emit({"kind": "moe_load", "arch": arch, "layers": layers, "status": "error",
                    "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})


def part_speed(p: Part) -> None:
    """Speed and memory rows: ours, hf, hf-tuned on every shape, same weights and tokens (in-process
    NF4 build), each with our memory estimate beside its measured peak (:func:`with_estimate`)."""
    for model, seq in DRY["speed_shapes"] if p.dry else SPEED_SHAPES:
        for system in SPEED_SYSTEMS:
            p.emit(p.launch(p.spec(system, model, seq, "speed"), ROW_CAP_S["speed"]))


def part_unsloth(p: Part) -> None:
    """Unsloth on the speed shapes: a bf16 checkpoint written here (its cost inside this part), then
    its row. Skipped without Unsloth, on the CPU, or with under :data:`UNSLOTH_NEED_S` left."""
    from benchmarks.run import prepare_weights, unsloth_available
    from benchmarks.systems import UNSLOTH_MISSING

    for model, seq in DRY["speed_shapes"] if p.dry else SPEED_SHAPES:
        spec = p.spec("unsloth", model, seq, "speed")
        reason = (UNSLOTH_MISSING if not unsloth_available(p.ctx.get("peers")) else "unsloth needs a CUDA GPU"
                  if p.dry else f"not enough time left ({p.left():.0f} s of the {UNSLOTH_NEED_S:.0f} s a checkpoint "
                  "write and a row take)" if p.left() < UNSLOTH_NEED_S else None)
        if reason:
            p.emit({**_base(spec), "status": "skipped", "reason": reason})
            continue
        t0 = time.time()
        try:
            _, ckpt = prepare_weights(model, p.work / "ckpt", spec.seed, timeout=max(5.0, p.left() - 60.0))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            p.emit({**_base(spec), "status": "error", "error": f"writing the checkpoint failed: {e}"})
            continue
        spec = replace(spec, weights="checkpoint", checkpoint_dir=ckpt)
        row = p.launch(spec, ROW_CAP_S["unsloth"], extra_path=p.ctx.get("peers"))
        p.emit({**row, "checkpoint_write_s": round(time.time() - t0 - row.get("load_s", 0.0), 1)})
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)


def part_compile(p: Part) -> None:
    """Ours with ``performance.compile: reduce-overhead`` (:data:`COMPILE_ROWS`); GPU only."""
    for model, seq, extra in COMPILE_ROWS:
        spec = p.spec("qlora_trainer", model, seq, "speed", extra=extra)
        if p.dry:
            p.emit({**_base(spec), "status": "skipped", "reason": "dry run: compiling outlasts the box on the CPU"})
            continue
        p.emit(p.launch(spec, ROW_CAP_S["compile"]))


def part_variants(p: Part) -> None:
    """Variants of ours on the speed shapes (:data:`SPEED_VARIANTS`, e.g. checkpoint_layers=auto under a cap)."""
    for model, seq in DRY["speed_shapes"] if p.dry else SPEED_SHAPES:
        for extra, cap in SPEED_VARIANTS:
            spec = p.spec("qlora_trainer", model, seq, "speed", extra=extra, cap_gb=None if p.dry else cap)
            p.emit(p.launch(spec, ROW_CAP_S["speed"]))


def _base(spec: RunSpec) -> dict:
    from benchmarks.spec import base_row

    return base_row(spec)


def part_big(p: Part) -> None:
    """70B: ours at seq 512 and 2048, HF at 512 (peak memory and speed), in-process layer by layer."""
    for system, model, seq in DRY["big_rows"] if p.dry else BIG_ROWS:
        p.emit(p.launch(p.spec(system, model, seq, "big"), ROW_CAP_S["big"]))


def part_long(p: Part) -> None:
    """Long context, ours: one training step at the goal under the cap (pass/fail); then, while time is
    left, one probe beyond each passed goal (x2, to the model's maximum) or below each failed one (/2)."""
    from qlora_trainer.models.catalog import get_arch

    goals = DRY["long_goals"] if p.dry else LONG_GOALS
    extra = {"performance": DRY["long_model"] if p.dry else LONG_MODEL}
    done = []
    for model, seq, cap in goals:
        row = p.launch(p.spec("qlora_trainer", model, seq, "long", cap_gb=cap, extra=extra), ROW_CAP_S["long"])
        done.append(p.emit({**row, "kind": "long_context", "goal_seq_len": seq, "passed": row["status"] == "ok"}))
    for row in done:
        if row["status"] not in ("ok", "oom"):
            continue
        top = get_arch(row["model"]).max_position
        seq = min(2 * row["seq_len"], top) if row["passed"] else row["seq_len"] // 2
        if seq == row["seq_len"] or p.left() < 30.0:
            continue
        spec = p.spec("qlora_trainer", row["model"], seq, "long", cap_gb=row["cap_gb"], extra=extra)
        probe = p.launch(spec, ROW_CAP_S["long"])
        p.emit({**probe, "kind": "long_context", "goal_seq_len": row["goal_seq_len"], "probe": True,
                "passed": probe["status"] == "ok"})


def part_calibration(p: Part) -> None:
    """The CUDA context measured, then our estimate vs the measured peak (allocated and reserved) for
    every step row measured so far in this call, then ``qlora-trainer memory --measure`` on the headline shape."""
    from benchmarks.calibrate import compare_rows, cuda_context, memory_cli

    p.emit({"kind": "cuda_context", **cuda_context(p.ctx["device"])})
    doc = json.loads(Path(p.ctx["results"]).read_text()) if Path(p.ctx["results"]).is_file() else {"rows": []}
    for row in compare_rows(doc["rows"]):
        p.emit(row)
    model, seq = ("tiny-64", 64) if p.dry else SPEED_SHAPES[0]
    if p.left() > (10.0 if p.dry else 60.0):
        p.emit({"kind": "memory_cli", **memory_cli(model, seq, measure=not p.dry, timeout=p.left() - 5.0)})


def part_nf4_paths(p: Part) -> None:
    """Which ``performance.nf4_matmul`` path wins per M bucket (``bench_nf4_lora.bench_paths``): every
    projection shape of Llama-3-8B and Llama-2-7B, headline buckets (8B/2048, 7B/512) first, until
    the box ends. The dry run: one tiny-64 projection at 96 tokens under the interpreter."""
    import torch

    from benchmarks.kernels.bench_nf4_lora import PATH_BUCKETS, PATH_MODELS, bench_paths

    if p.dry:
        models, buckets = {"tiny-64": [("down_proj", 128, 384)]}, [("tiny-64", 96)]
    else:
        models, buckets = PATH_MODELS, PATH_BUCKETS
    torch.manual_seed(p.ctx["seed"])
    bench_paths(models, buckets, device=p.ctx["device"], dtype=getattr(torch, p.ctx["dtype"]),
                deadline=p.ctx["deadline"], emit=p.emit, rep_ms=40)


PARTS = {"correctness": part_correctness, "moe-load": part_moe_load, "speed": part_speed, "calibration": part_calibration,
         "70b": part_big, "long": part_long, "unsloth": part_unsloth, "nf4_paths": part_nf4_paths,
         "compile": part_compile, "variants": part_variants}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in PARTS:
        print(f"usage: python -m benchmarks.parts {{{','.join(PARTS)}}} CTX_JSON ROWS_JSONL", file=sys.stderr)
        return 2
    from benchmarks.stage import assert_not_shadowed, kill_groups_on_sigterm

    assert_not_shadowed()
    kill_groups_on_sigterm()
    part = Part(json.loads(Path(argv[1]).read_text()), Path(argv[2]), argv[0])
    PARTS[argv[0]](part)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
