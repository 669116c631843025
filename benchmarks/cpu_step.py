"""One training step on the CPU: ours against the HF stack (transformers + PEFT + bitsandbytes NF4)
in the same run, on the same checkpoint, batch and optimizer (torch AdamW), step-0 losses checked.

    python -m benchmarks.cpu_step                      # cpu-1024: 8 layers, hidden 1024, seq 256
    python -m benchmarks.cpu_step --repeats 5 --threads 2

Each (system, repeat) is its own process (``run.launch``), the systems alternating so that a change
in the machine's load hits both; a row's step time is the median of its timed steps, a system's the
median over its repeats. Extra memory: the peak resident set during the steps minus the resident set
after loading (``harness``). Writes ``<out>/<name>.json`` and ``.md`` (CPU model, load average before
and after, versions, date, the ratio ours / hf). Not a test: numbers depend on the machine.
Exit code 1 when a row failed or the step-0 losses disagree beyond fp32's tolerance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.run import launch, prepare_weights
from benchmarks.spec import RunSpec, loss_rtol

SYSTEMS = ("hf", "qlora_trainer")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summarize(rows: list[dict]) -> dict:
    """Per system: median / min of the rows' median step seconds, median extra RSS, step-0 loss;
    and ``ratio`` (ours / hf step time, < 1 = ours faster), ``memory_ratio`` and ``step0_loss_ok``."""
    out: dict = {}
    for system in SYSTEMS:
        ok = [r for r in rows if r["system"] == system and r["status"] == "ok"]
        if not ok:
            continue
        extra = [r["step_extra_rss_gb"] for r in ok if r.get("step_extra_rss_gb") is not None]
        out[system] = {"median_step_s": statistics.median(r["median_step_s"] for r in ok),
                       "min_step_s": min(min(r["step_seconds"]) for r in ok),
                       "step_extra_rss_gb": statistics.median(extra) if extra else None,
                       "step0_loss": ok[0]["step0_loss"], "repeats": len(ok)}
    if len(out) == 2:
        hf, ours = out["hf"], out["qlora_trainer"]
        out["ratio"] = ours["median_step_s"] / hf["median_step_s"]
        if hf["step_extra_rss_gb"] and ours["step_extra_rss_gb"] is not None:
            out["memory_ratio"] = ours["step_extra_rss_gb"] / hf["step_extra_rss_gb"]
        rdiff = abs(ours["step0_loss"] - hf["step0_loss"]) / abs(hf["step0_loss"])
        out["step0_loss_rdiff"], out["step0_loss_ok"] = rdiff, rdiff <= loss_rtol("float32")
    return out


def to_markdown(doc: dict) -> str:
    s, d = doc["summary"], doc["device"]
    lines = [f"# One CPU training step: qlora_trainer vs the HF stack ({doc['spec']['model']})", "",
             f"{d['cpu']} ({' '.join(d.get('cpu_flags', []))}), {doc['threads']} thread(s); "
             f"load average before {d['load_before']}, "
             f"after {d['load_after']}; {d['date']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v), "",
             f"seq {doc['spec']['seq_len']}, batch {doc['spec']['batch']}, fp32, LoRA r {doc['spec']['lora_r']} "
             f"all-linear, torch AdamW, gradient checkpointing; {doc['spec']['warmup']} warm-up + "
             f"{doc['spec']['steps']} timed steps per process, {doc['repeats']} processes per system", "",
             "| system | median step s | fastest step s | extra RSS GB | step-0 loss |", "|---|---|---|---|---|"]
    for system in SYSTEMS:
        if system in s:
            r = s[system]
            extra = "-" if r["step_extra_rss_gb"] is None else f"{r['step_extra_rss_gb']:.3f}"
            lines.append(f"| {system} | {r['median_step_s']:.3f} | {r['min_step_s']:.3f} | {extra} | "
                         f"{r['step0_loss']:.6f} |")
    if "ratio" in s:
        lines += ["", f"ours / hf step time: **{s['ratio']:.3f}** (< 1: ours faster); extra memory ratio "
                      f"{s.get('memory_ratio', float('nan')):.2f}; step-0 losses agree: {s['step0_loss_ok']} "
                      f"(rel diff {s['step0_loss_rdiff']:.1e})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.results import device_info
    from qlora_trainer.io import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cpu-1024", help="catalog name (default: cpu-1024)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="processes per system (alternating)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default=None, help="file stem (default: cpu-step-<UTC date>)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    a = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every child (child_env copies os.environ)
    stamp = device_info("python -m benchmarks.cpu_step " + shlex.join(sys.argv[1:] if argv is None else argv))
    from qlora_trainer.doctor import cpu_features

    features = cpu_features()  # what bitsandbytes' CPU branches see
    flags = [k for k in ("avx512f", "avx512_bf16") if features.get(k)] + [features["torch_cpu_capability"]]
    stamp.update(cpu=cpu_model(), cpu_flags=flags, cpu_features=features, load_before=load_average())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qlora-cpu-step-") as work:
        _, ckpt = prepare_weights(a.model, Path(work) / "ckpt", 0, timeout=a.timeout)
        for rep in range(a.repeats):
            for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
                spec = RunSpec(system=system, model=a.model, seq_len=a.seq_len, batch=a.batch, warmup=a.warmup,
                               steps=a.steps, device="cpu", dtype="float32", checkpoint_dir=ckpt)
                row = launch(spec, Path(work) / str(rep), timeout=a.timeout, quiet=True)
                row.pop("traceback", None) if row["status"] == "ok" else None
                rows.append({**row, "repeat": rep})
                print(f"[cpu_step] {rep} {system}: {row['status']} {row.get('median_step_s', row.get('error'))}",
                      flush=True)
    stamp["load_after"] = load_average()
    spec = {"model": a.model, "seq_len": a.seq_len, "batch": a.batch, "warmup": a.warmup, "steps": a.steps,
            "lora_r": RunSpec.lora_r}
    doc = {"device": stamp, "spec": spec, "threads": a.threads, "repeats": a.repeats,
           "summary": summarize(rows), "rows": rows}
    name = a.name or "cpu-step-" + dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=1))
    atomic_write_text(out / f"{name}.md", to_markdown(doc))
    print(to_markdown(doc))
    bad = any(r["status"] != "ok" for r in rows) or not doc["summary"].get("step0_loss_ok", False)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
