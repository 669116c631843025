"""Results: ratios and step-0 loss checks over rows, then JSON + markdown + charts, each stamped
with the device (GPU name, driver), library versions, date and command line.

JSON schema (``benchmarks/results/<name>.json``)::

    {"device": {"gpu", "driver", "cuda", "python", "versions": {torch, transformers, peft,
                bitsandbytes, unsloth, qlora-trainer}, "date", "command"},
     "loss_rtol": {dtype: rtol},
     "rows": [{"model", "seq_len", "batch", "system": hf|unsloth|qlora_trainer, "status",
               "tokens_per_s", "median_step_s", "peak_allocated_gb", "peak_reserved_gb",
               "weights_gb", "step0_loss", "speedup_vs_hf", "memory_vs_hf", "speedup_vs_unsloth",
               "memory_vs_unsloth", "step0_loss_ref", "step0_loss_ok", ...}
              | {"kind": "max_context", "model", "system", "cap_gb", "max_seq_len", "probes"}]}
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.spec import LOSS_RTOL, loss_rtol
from benchmarks.systems import PEERS, SYSTEMS

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "unsloth", "qlora-trainer")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def device_info(command: str | None = None) -> dict:
    """GPU name and driver (``nvidia-smi``; None on CPU), versions, UTC date, the command line
    (``command``, default this process's argv)."""
    gpu = driver = cuda = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        gpu, driver = [s.strip() for s in out.splitlines()[0].split(",")][:2]
        import torch  # only on a GPU machine: the CPU runner stays light

        cuda = torch.version.cuda
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass
    return {"gpu": gpu or "cpu", "driver": driver, "cuda": cuda, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "versions": {p: _version(p) for p in PACKAGES},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command or shlex.join([Path(sys.executable).name] + sys.argv)}


def peer_key(peer: str) -> str:
    """``hf-tuned`` -> ``hf_tuned``: the suffix of a row's ``speedup_vs_*`` / ``memory_vs_*`` fields."""
    return peer.replace("-", "_")


def annotate(rows: list[dict]) -> list[dict]:
    """Add ratios vs hf and vs unsloth (throughput and peak allocated memory) and the step-0 loss check
    (reference: hf's loss in the same (model, seq_len, batch, cap) group, else the first ok row)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind", "step") == "step":
            groups.setdefault((r["model"], r["seq_len"], r["batch"]), []).append(r)
    for group in groups.values():
        plain = [r for r in group if r.get("status") == "ok" and not r.get("extra")]  # peers: no variant
        ok = {r["system"]: r for r in sorted(plain, key=lambda r: r.get("cap_gb") is not None, reverse=True)}
        ref = ok.get("hf") or next(iter(ok.values()), None)
        for r in group:
            if r.get("status") != "ok":
                continue
            for peer in PEERS:
                p, key = ok.get(peer), peer_key(peer)
                r[f"speedup_vs_{key}"] = r["tokens_per_s"] / p["tokens_per_s"] if p else None
                pa, ra = (p or {}).get("peak_allocated_gb"), r.get("peak_allocated_gb")
                r[f"memory_vs_{key}"] = ra / pa if pa and ra is not None else None
            tol = loss_rtol(r.get("dtype", "bfloat16"))
            r["step0_loss_ref"] = ref["system"]
            r["step0_loss_rdiff"] = abs(r["step0_loss"] - ref["step0_loss"]) / abs(ref["step0_loss"])
            r["step0_loss_ok"] = r["step0_loss_rdiff"] <= tol
    return rows


def disagreements(rows: list[dict]) -> list[dict]:
    """Rows whose step-0 loss disagrees with the reference beyond the tolerance."""
    return [r for r in rows if r.get("step0_loss_ok") is False]


def label(row: dict) -> str:
    """The system column of a row: its system, plus its variant settings (``extra``), e.g.
    ``qlora_trainer [checkpoint_layers=auto]``."""
    extra = row.get("extra") or {}
    flat = [f"{k}={v}" for section in extra.values() if isinstance(section, dict) for k, v in section.items()]
    flat += [f"{k}={v}" for k, v in extra.items() if not isinstance(v, dict)]
    return f"{row['system']} [{', '.join(flat)}]" if flat else row["system"]


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def to_markdown(doc: dict) -> str:
    d = doc["device"]
    v = _versions(d)
    lines = [f"# Benchmark results ({d['date']})", "",
             f"Device: **{d['gpu']}** (driver {d['driver'] or '-'}, CUDA {d['cuda'] or '-'}); {v}.", "",
             f"Command: `{d['command']}`", "",
             "GB = 2^30 bytes. Ratios: speed = tokens/s over the peer's; memory = peak allocated over the peer's. "
             f"Step-0 loss must agree with the reference (hf) within rtol {doc['loss_rtol']}.", ""]
    step = [r for r in doc["rows"] if r.get("kind", "step") == "step"]
    if step:
        ratio_heads = " | ".join(f"x {p} speed | x {p} mem" for p in PEERS)
        lines += ["| model | seq | batch | system | status | tok/s | step s | peak alloc | peak reserved | weights | "
                  f"{ratio_heads} | step-0 loss | loss ok |", "|" + "---|" * (12 + 2 * len(PEERS))]
        for r in step:
            ok = r.get("status") == "ok"
            note = r["status"] if ok else f"{r['status']}: {r.get('reason') or r.get('error', '')}"[:80]
            lines.append(
                f"| {r['model']} | {r['seq_len']} | {r['batch']} | {label(r)} | {note} | "
                f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('median_step_s'), '.3f')} | "
                f"{_fmt(r.get('peak_allocated_gb'))} | {_fmt(r.get('peak_reserved_gb'))} | {_fmt(r.get('weights_gb'))} | "
                + "".join(f"{_fmt(r.get('speedup_vs_' + peer_key(p)))} | {_fmt(r.get('memory_vs_' + peer_key(p)))} | "
                          for p in PEERS) +
                f"{_fmt(r.get('step0_loss'), '.5f')} | {'-' if 'step0_loss_ok' not in r else r['step0_loss_ok']} |")
        bad = disagreements(step)
        lines += ["", f"**Step-0 loss disagreement in {len(bad)} row(s).**" if bad else
                  "All step-0 losses agree within tolerance."]
    ctx = [r for r in doc["rows"] if r.get("kind") == "max_context"]
    if ctx:
        lines += ["", "## Max context (largest seq_len, 1k steps, completing a training step under the cap)", "",
                  "| model | system | cap GB | max seq_len |", "|---|---|---|---|"]
        for r in ctx:
            m = r["max_seq_len"]
            shown = f"{r['status']}: {r.get('reason', '')}" if m < 0 else "<1,024" if m == 0 else format(m, ",")
            lines.append(f"| {r['model']} | {r['system']} | {r['cap_gb']:g} | {shown} |")
    return "\n".join(lines) + "\n"


def _versions(device: dict) -> str:
    return ", ".join(f"{k} {x}" for k, x in device["versions"].items() if x)


def _stamp(doc: dict) -> str:
    d = doc["device"]
    return f"{d['gpu']} (driver {d['driver'] or '-'}) | {_versions(d)} | {d['date']}\n{d['command']}"


def _bars(doc: dict, groups: list[tuple], labels: list[str], series: dict[str, list[float]], ylabel: str,
          path: Path) -> Path:
    """One grouped bar chart, stamped with device, versions, date and command line at the bottom
    (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_trainer.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.4))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} - {doc['device']['gpu']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, _stamp(doc), fontsize=5, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def charts(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    """Grouped bar charts by system: tokens/s and peak allocated GB per (model, seq_len, batch), and
    max seq_len per (model, cap)."""
    paths = []
    systems = SYSTEMS
    rows = [r for r in doc["rows"] if r.get("kind", "step") == "step" and r.get("status") == "ok"]
    keys = sorted({(r["model"], r["seq_len"], r["batch"]) for r in rows}, key=str)
    present = [s for s in systems if any(r["system"] == s for r in rows)]
    for metric, label in (("tokens_per_s", "tokens / s"), ("peak_allocated_gb", "peak allocated GB")):
        if not rows or all(r.get(metric) is None for r in rows):
            continue
        series = {s: [next((r.get(metric) or 0.0 for r in rows if r["system"] == s and
                            (r["model"], r["seq_len"], r["batch"]) == k), 0.0) for k in keys] for s in present}
        paths.append(_bars(doc, keys, [f"{m}\nseq {t} x{b}" for m, t, b in keys], series, label,
                           out_dir / f"{stem}-{metric}.png"))
    ctx = [r for r in doc["rows"] if r.get("kind") == "max_context" and r["max_seq_len"] >= 0]
    if ctx:
        keys = sorted({(r["model"], r["cap_gb"]) for r in ctx}, key=str)
        series = {s: [next((float(r["max_seq_len"]) for r in ctx if r["system"] == s and
                            (r["model"], r["cap_gb"]) == k), 0.0) for k in keys]
                  for s in systems if any(r["system"] == s for r in ctx)}
        paths.append(_bars(doc, keys, [f"{m}\n{c:g} GB" for m, c in keys], series, "max seq_len",
                           out_dir / f"{stem}-max_seq_len.png"))
    return paths


def write_results(out_dir: str | Path, rows: list[dict], *, stem: str, device: dict | None = None,
                  make_charts: bool = True) -> dict[str, Path]:
    """Annotate ``rows`` and write ``<stem>.json``, ``<stem>.md`` (and charts) atomically."""
    from qlora_trainer.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": device or device_info(), "loss_rtol": LOSS_RTOL, "rows": annotate(rows)}
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    atomic_write_text(paths["json"], json.dumps(doc, indent=1))
    atomic_write_text(paths["markdown"], to_markdown(doc))
    if make_charts:
        for p in charts(doc, out, stem):
            paths[p.stem] = p
    return paths
