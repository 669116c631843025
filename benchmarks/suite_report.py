"""``suite.md``: the step-row table of :func:`benchmarks.results.to_markdown`, then one section per
part of the suite (time boxes, kernel checks, MoE load peaks, long context, calibration, NF4 matmul
paths), all from ``suite.json``."""

from __future__ import annotations

from benchmarks.results import _fmt, label
from benchmarks.results import to_markdown as step_markdown


def _rows(doc: dict, kind: str) -> list[dict]:
    return [r for r in doc["rows"] if r.get("kind", "step") == kind]


def budget_markdown(doc: dict) -> list[str]:
    s = doc["suite"]
    lines = [f"## Time boxes ({'dry run, ' if s['dry_run'] else ''}budget {s['budget_s']:.0f} s, "
             f"elapsed {s['elapsed_s']:.0f} s)", "", "| part | planned s | box s | used s | status | rows |",
             "|---|---|---|---|---|---|"]
    for p in s["parts"]:
        lines.append(f"| {p['part']} | {p['planned_s']:.0f} | {_fmt(p.get('box_s'), '.0f')} | "
                     f"{_fmt(p.get('used_s'), '.0f')} | {p['status']} | {p.get('rows', '-')} |")
    return lines


def correctness_markdown(doc: dict) -> list[str]:
    lines = []
    for r in [r for r in doc["rows"] if r.get("kind") in ("kernel_tests", "gpu_tests")]:
        title = f"{'Kernel tests' if r['kind'] == 'kernel_tests' else 'GPU tests'} ({r.get('selection', 'all')})"
        if "duration_s" not in r:
            lines += ["", f"## {title}: {r['status']} ({r.get('reason', '')})"]
            continue
        lines += ["", f"## {title}: {r['status']} ({r.get('passed', 0)} passed, {r.get('failed', 0)} failed, "
                      f"{r.get('errors', 0)} errors, {r.get('skipped', 0)} skipped; {r['duration_s']:.0f} s)", "",
                  f"`{r['command']}`"]
        lines += [f"- FAILED {f}" for f in r.get("failures", [])]
    for r in _rows(doc, "kernel_step"):
        if "model" not in r:
            lines += ["", f"## One training step, kernels on vs off: {r['status']} ({r.get('error') or r.get('reason', '')})"]
            continue
        lines += ["", f"## One training step, kernels on vs off ({r['model']}, {r['device']}): {r['status']}", "",
                  "| dtype | loss (kernels) | loss (reference) | loss rdiff | max grad rdiff | max adapter rdiff | ok |",
                  "|---|---|---|---|---|---|---|"]
        for dt, c in r["checks"].items():
            if "error" in c:
                lines.append(f"| {dt} | error: {c['error'][:100]} | | | | | False |")
                continue
            lines.append(f"| {dt} | {c['loss_kernels']:.5f} | {c['loss_reference']:.5f} | {c['loss_rdiff']:.1e} | "
                         f"{c['grad_rdiff_max']:.1e} | {c['param_rdiff_max']:.1e} | {c['ok']} |")
    return lines


def _gib(v: int | None) -> str:
    return _fmt(None if v is None else v / 2**30, ".3f")


def moe_load_markdown(doc: dict) -> list[str]:
    rows = _rows(doc, "moe_load")
    if not rows:
        return []
    lines = ["", "## MoE load peak, NF4 (GiB; synthetic checkpoints: the model's layer shapes, few layers; "
                 "extrapolated = estimated for the full depth, not measured)", "",
             "| model | layers | path | peak | kept | transient | experts 16-bit | write s | load s | "
             "extrapolated layers | extrapolated peak | extrapolated kept | extrapolated experts 16-bit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "path" not in r:
            lines.append(f"| {r['arch']} | {r['layers']} | {r['status']}: {(r.get('error') or r.get('reason') or '')[:80]} "
                         "| | | | | | | | | | |")
            continue
        peak = _gib(r["peak"]) if r["status"] == "ok" else r["status"][:60]
        lines.append(f"| {r['arch']} ({r['synthetic']}) | {r['layers']} | {r['path']} | {peak} | {_gib(r['kept'])} | "
                     f"{_gib(r['transient'])} | {_gib(r['experts_dense'])} | {_fmt(r['checkpoint_write_s'], '.1f')} | "
                     f"{_fmt(r.get('load_s'), '.1f')} | {r['extrapolated_layers']} | {_gib(r.get('extrapolated_peak'))} | "
                     f"{_gib(r.get('extrapolated_kept'))} | {_gib(r['extrapolated_experts_dense'])} |")
    return lines


def long_markdown(doc: dict) -> list[str]:
    rows = _rows(doc, "long_context")
    if not rows:
        return []
    lines = ["", "## Long context (ours, one training step under the cap)", "",
             "| model | seq_len | goal | cap GB | result | peak alloc | peak reserved | step s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = "PASS" if r["passed"] else f"FAIL ({r['status']}: {(r.get('error') or r.get('reason') or '')[:60]})"
        lines.append(f"| {r['model']} | {r['seq_len']:,} | {r['goal_seq_len']:,}{' (probe)' if r.get('probe') else ''} | "
                     f"{_fmt(r.get('cap_gb'), 'g')} | {res} | {_fmt(r.get('peak_allocated_gb'))} | "
                     f"{_fmt(r.get('peak_reserved_gb'))} | {_fmt(r.get('median_step_s'), '.1f')} |")
    return lines


def calibration_markdown(doc: dict) -> list[str]:
    lines = []
    for r in _rows(doc, "cuda_context"):
        got = (f"{r['after_kernels_gib']:.3f} GiB after cuBLAS/SDPA/Triton ({r['at_init_gib']:.3f} at init)"
               if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}")
        lines += ["", f"## CUDA context: {got}; the estimator assumes {r['assumed_gib']:.3f} GiB"]
    rows = _rows(doc, "calibration")
    if rows:
        lines += ["", "## Memory estimate vs measured (GiB; rdiff = (estimate - measured) / measured; goal ±5%)", "",
                  "| model | seq | system | cap | est alloc | measured alloc | rdiff | est reserved | measured reserved | "
                  "rdiff | within 5% |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['seq_len']} | {label(r)} | {_fmt(r.get('cap_gb'), 'g')} | "
                         f"{r['est_allocated_gib']:.2f} | {_fmt(r['measured_allocated_gib'])} | "
                         f"{_fmt(r['rdiff_allocated'], '+.1%')} | {r['est_reserved_gib']:.2f} | "
                         f"{_fmt(r['measured_reserved_gib'])} | {_fmt(r['rdiff_reserved'], '+.1%')} | "
                         f"{'-' if r['within_5pct'] is None else r['within_5pct']} |")
    for r in _rows(doc, "memory_cli"):
        lines += ["", f"`{r['command']}`: {r['status']}" + (f" — {r.get('error')}" if r.get("error") else "")]
        for m in (r.get("estimate") or {}).get("measured") or []:
            lines.append(f"- {m}")
    return lines


def nf4_paths_markdown(doc: dict) -> list[str]:
    rows = _rows(doc, "nf4_paths_winner")
    if not rows:
        return []
    lines = ["", "## NF4 matmul paths (performance.nf4_matmul; one decoder layer's base GEMMs: 2 x forward + dx, ms)", "",
             "| model | tokens | " + " | ".join(rows[0]["layer_ms"]) + " | winner | x dequant |",
             "|---|---|" + "---|" * (len(rows[0]["layer_ms"]) + 2)]
    for r in rows:
        ms = " | ".join(f"{v:.3f}" for v in r["layer_ms"].values())
        lines.append(f"| {r['model']} | {r['tokens']} | {ms} | {r['winner']} | {r['speedup_vs_dequant'][r['winner']]:.2f} |")
    return lines


def to_markdown(doc: dict) -> str:
    head = step_markdown(doc).rstrip("\n").splitlines()
    body = [*budget_markdown(doc), *correctness_markdown(doc), *moe_load_markdown(doc), *long_markdown(doc), *calibration_markdown(doc),
            *nf4_paths_markdown(doc)]
    return "\n".join(head[:6] + body + [""] + ["## Speed and memory rows", ""] + head[6:]) + "\n"
