"""The whole GPU check, over one or several calls: ``python -m benchmarks.suite --out DIR``.

Parts run in order of value, each in its own process (:mod:`benchmarks.parts`) with its own time box.
Every row is appended to ``DIR/suite.rows.jsonl`` the moment it ends, and after each part the suite
rewrites ``DIR/suite.json`` and ``DIR/suite.md`` (stamped with device, driver, versions, date, command);
every process's output goes to ``DIR/suite.log``, pytest's junit reports to ``DIR/junit-*.xml``. A
timeout or a kill keeps everything finished before it. At most 7 files: the GPU machine returns 8.

    correctness   kernel tests on CUDA (bf16 first, then the rest), one training step kernels on == off,
                  the gpu-marked tests outside tests/kernels
    moe-load      peak memory of loading an MoE in NF4, streamed vs the old path: synthetic Mixtral-8x7B and
                  Qwen3-30B-A3B checkpoints (real layer shapes, 2 layers), extrapolated to their depth
    speed         Llama-3-8B/2048 and Llama-2-7B/512: ours, hf, hf-tuned, our estimate beside each peak
    calibration   CUDA context measured; estimate vs measured peak for every row; memory --measure
    70b           Llama-3-70B: ours at 512 and 2048, hf at 512
    long          Llama-3.1-70B 32k under 48 GB, Llama-3.1-8B 128k under 24 GB (pass/fail)
    unsloth       Unsloth on the speed shapes (writes a checkpoint first)
    nf4_paths     performance.nf4_matmul: dequant vs chunked vs fused per M bucket, 8B and 7B shapes
    compile       ours with performance.compile: reduce-overhead
    variants      ours with performance.checkpoint_layers=auto under a 24 GB cap

Which parts: ``--parts`` (names or numbers), else the planner (:mod:`benchmarks.planner`): the most
valuable parts that the suite JSON files committed under ``benchmarks/results/`` have not measured, as
many as fit the budget; so the first call measures correctness, moe-load, calibration, 70B and NF4
paths (430 s: speed's 240 s do not fit beside correctness and moe-load), the second speed, long
context and compile, the third Unsloth and the variants. ``--dry-run``: every part,
on the CPU with tiny shapes (kernels under the Triton interpreter). Boxes: each part's planned seconds
(``PLAN``, scaled to ``--budget-s``), plus whatever earlier parts left unused. The project is imported
from its own wheel (``--wheel``, else built from this checkout), never from the repo root
(:mod:`benchmarks.stage`). Exit code: 0 when every part ran to its end and every check in it held, 1
otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks import stage

# (part, planned seconds on one H100/H200, planned seconds in a dry run), in order of value. The first
# call's parts take 430 s of its default 470 s (moe-load's 80 s: see parts.MOE_LOAD): the device runs one
# command for at most 600 s, and a cold start plus the copies must fit 15 minutes of device time with a rerun to spare.
# Dry-run seconds: measured on the 2-core CPU box at load 8-12 (each row process imports torch and
# transformers, 15-30 s there), plus a quarter.
PLAN = [("correctness", 170, 200), ("speed", 240, 110), ("calibration", 40, 30), ("moe-load", 80, 30),
        ("70b", 105, 85), ("long", 110, 100), ("unsloth", 150, 3), ("nf4_paths", 35, 60), ("compile", 90, 3),
        ("variants", 60, 60)]
NAMES = [p[0] for p in PLAN]
GPU_BUDGET_S = 470.0
RESERVE_S = 3.0  # for the last write of the results after the final part
STEM = "suite"
ROWS = f"{STEM}.rows.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for suite.json, suite.md and suite.log")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels under the interpreter")
    ap.add_argument("--parts", nargs="+", default=None, metavar="PART",
                    help="parts to run, by name or number: " + ", ".join(f"{i + 1}={n}" for i, n in enumerate(NAMES)) +
                    " (default: the planner's choice from --results; every part in a dry run)")
    ap.add_argument("--results", default=None, metavar="DIR",
                    help="committed suite results the planner reads (default benchmarks/results)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"whole-suite time box (default {GPU_BUDGET_S:.0f} s, dry run {sum(p[2] for p in PLAN)} s)")
    ap.add_argument("--wheel", default=None, help="the project's wheel (default: build one from this checkout)")
    ap.add_argument("--peers", default=None, help="Unsloth: a folder of its wheels (device-peers) or of them unpacked")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.parts is None:
        return a
    parts = []
    for p in a.parts:
        name = NAMES[int(p) - 1] if p.isdigit() and 1 <= int(p) <= len(NAMES) else p
        if name not in NAMES:
            ap.error(f"--parts: unknown part {p!r} (choose from {', '.join(NAMES)} or 1-{len(NAMES)})")
        parts.append(name)
    a.parts = [n for n in NAMES if n in parts]  # always in order of value
    if a.budget_s is not None and a.budget_s <= 0:
        ap.error("--budget-s: must be > 0")
    return a


def default_budget(dry: bool) -> float:
    return float(sum(p[2] for p in PLAN)) if dry else GPU_BUDGET_S


def choose_parts(a: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """(parts to run, parts already measured -> the results file): ``--parts``, every part in a dry
    run, else the planner's choice for the budget."""
    from benchmarks.planner import RESULTS, measured_parts, next_parts

    if a.parts is not None:
        return a.parts, {}
    if a.dry_run:
        return list(NAMES), {}
    measured = measured_parts(a.results or RESULTS)
    budget = (a.budget_s or default_budget(False)) - RESERVE_S
    return next_parts([(p[0], p[1]) for p in PLAN], measured, budget), measured


def plan_boxes(parts: list[str], budget_s: float, dry: bool) -> dict[str, float]:
    """Planned seconds per selected part: its share of ``PLAN`` scaled to ``budget_s``."""
    col = 2 if dry else 1
    shares = {p[0]: float(p[col]) for p in PLAN if p[0] in parts}
    scale = (budget_s - RESERVE_S) / sum(shares.values())
    return {k: v * scale for k, v in shares.items()}


def unpack_peers(peers: str | None, work: Path) -> str | None:
    """A directory to put first on the Unsloth process's PYTHONPATH: ``peers`` itself when it is
    already unpacked, else its ``*.whl`` extracted under ``work``."""
    if not peers:
        return None
    wheels = sorted(Path(peers).glob("*.whl"))
    if not wheels:
        return str(Path(peers).resolve())
    dest = work / "peers"
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(dest)
    return str(dest)


class Suite:
    """Runs the parts and keeps ``DIR`` up to date."""

    def __init__(self, a: argparse.Namespace, command: str) -> None:
        from benchmarks.results import device_info

        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / f"{STEM}.log"
        self.log = open(self.log_path, "a", buffering=1)
        self.t0 = time.time()
        self.budget = a.budget_s or default_budget(a.dry_run)
        self.planned = plan_boxes(a.parts, self.budget, a.dry_run)
        self.rows: list[dict] = []
        self.rows_path = self.out / ROWS
        self.rows_path.write_text("")  # this call's rows, appended by the parts as each ends
        self.summary: list[dict] = [{"part": n, "planned_s": round(s, 1), "status": "pending"}
                                    for n, s in self.planned.items()]
        self.device = device_info(command)

    def say(self, msg: str) -> None:
        line = f"[suite {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write(self) -> None:
        """suite.json and suite.md, atomically, from everything finished so far."""
        from benchmarks.results import LOSS_RTOL, annotate
        from benchmarks.suite_report import to_markdown
        from qlora_trainer.io import atomic_write_text

        doc = {"suite": {"dry_run": self.a.dry_run, "budget_s": self.budget, "parts": self.summary,
                         "elapsed_s": round(time.time() - self.t0, 1)},
               "device": self.device, "loss_rtol": LOSS_RTOL, "rows": annotate(self.rows)}
        atomic_write_text(self.out / f"{STEM}.json", json.dumps(doc, indent=1))
        atomic_write_text(self.out / f"{STEM}.md", to_markdown(doc))

    def run_part(self, i: int, name: str, work: Path, peers: str | None) -> None:
        later = sum(s for n, s in self.planned.items() if self.a.parts.index(n) > i)
        left = self.budget - (time.time() - self.t0) - RESERVE_S
        box = min(left, max(left - later, 0.0))
        entry = self.summary[i] | {"box_s": round(box, 1)}
        if box < 5.0:
            self.summary[i] = entry | {"status": "skipped", "reason": "no time left in the suite's budget"}
            self.say(f"part {name}: skipped (box {box:.0f} s)")
            return
        ctx = {"dry_run": self.a.dry_run, "device": "cpu" if self.a.dry_run else "cuda",
               "dtype": "float32" if self.a.dry_run else "bfloat16", "deadline": time.time() + box - 3.0,
               "work": str(work / name), "out": str(self.out), "peers": peers, "results": str(self.out / f"{STEM}.json"),
               "seed": self.a.seed}
        ctx_path, rows_path = work / f"{name}.ctx.json", self.rows_path
        ctx_path.write_text(json.dumps(ctx))
        self.say(f"part {i + 1} {name}: box {box:.0f} s (planned {self.planned[name]:.0f} s)")
        t = time.time()
        cmd = [sys.executable, "-m", "benchmarks.parts", name, str(ctx_path), str(rows_path)]
        env = stage.child_env(smoke=self.a.dry_run)
        env["TRITON_INTERPRET"] = "1" if self.a.dry_run else "0"  # CPU tensors / compiled kernels
        rc = stage.run_boxed(cmd, timeout=box, own_group=True, cwd=stage.child_cwd(), env=env, stdout=self.log,
                             stderr=subprocess.STDOUT)
        status = "timeout" if rc is None else "done" if rc == 0 else f"exit {rc}"
        rows = [r for r in read_rows(rows_path) if r.get("part") == name]
        self.rows += rows
        self.summary[i] = entry | {"status": status, "used_s": round(time.time() - t, 1), "rows": len(rows)}
        self.say(f"part {i + 1} {name}: {status} after {time.time() - t:.0f} s, {len(rows)} rows")
        self.write()


def read_rows(path: Path) -> list[dict]:
    """The rows of ``suite.rows.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def failed_checks(doc_rows: list[dict], summary: list[dict]) -> list[str]:
    """Why the suite exits 1: parts that did not finish, failed checks, step-0 loss disagreements."""
    bad = [f"part {s['part']}: {s['status']}" for s in summary if s["status"] not in ("done", "skipped")]
    for r in doc_rows:
        kind = r.get("kind", "step")
        if kind in ("kernel_tests", "gpu_tests", "kernel_step") and r["status"] not in ("ok", "skipped"):
            bad.append(f"{kind}: {r['status']}" + (f" ({'; '.join(r.get('failures', [])[:3])})" if r.get("failures") else ""))
        if r.get("step0_loss_ok") is False:
            bad.append(f"step-0 loss disagreement: {r['model']} {r['seq_len']} {r['system']}")
        if kind == "moe_load" and r.get("status") == "error":
            bad.append(f"moe_load {r['arch']}: {r.get('error', '')[:120]}")
        if kind == "step" and r.get("status") == "error":
            bad.append(f"{r['model']} {r['seq_len']} {r['system']}: {r.get('error', '')[:120]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = "python -m benchmarks.suite " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not a.dry_run and shutil.which("nvidia-smi") is None:
        print("error: no CUDA GPU here (nvidia-smi not found); use --dry-run for the CPU run", file=sys.stderr)
        return 2
    if a.wheel and not Path(a.wheel).is_file():
        print(f"error: --wheel {a.wheel}: no such file (build it: see benchmarks/README.md)", file=sys.stderr)
        return 2
    stage.kill_groups_on_sigterm()  # a suite ended by SIGTERM takes its running part (and its rows) along
    work = Path(tempfile.mkdtemp(prefix="qlora-suite-"))
    try:
        try:
            site = stage.stage(work, a.wheel)
        except (RuntimeError, OSError, zipfile.BadZipFile) as e:
            print(f"error: staging the project failed: {e}", file=sys.stderr)
            return 2
        sys.path.insert(0, str(site))  # this process too reads versions and writes through qlora_trainer.io
        a.parts, measured = choose_parts(a)
        suite = Suite(a, command)
        if measured:
            suite.say("already measured: " + ", ".join(f"{n} ({f})" for n, f in measured.items()))
        suite.say(f"budget {suite.budget:.0f} s; plan: " +
                  ", ".join(f"{n} {s:.0f} s" for n, s in suite.planned.items()) + f"; site {site}")
        suite.write()
        peers = unpack_peers(a.peers, work)
        for i, name in enumerate(a.parts):
            suite.run_part(i, name, work, peers)
        suite.write()
        bad = failed_checks(suite.rows, suite.summary)
        print((suite.out / f"{STEM}.md").read_text())
        for b in bad:
            suite.say(f"CHECK FAILED: {b}")
        suite.say(f"finished in {time.time() - suite.t0:.0f} s of {suite.budget:.0f} s")
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
