"""Markdown rendering of estimates and measured-vs-estimated tables (no heavy imports)."""

from __future__ import annotations

from qlora_trainer.memory.estimate import CUDA_CONTEXT, GIB, MemoryEstimate


def estimate_markdown(est: MemoryEstimate) -> str:
    """Breakdown table (GiB and % of allocated) then allocated / reserved / paged / context / total."""
    s = est.settings
    alloc = est.allocated_bytes or 1
    lines = [f"### {est.arch}: batch {s['batch']} x seq {s['seq_len']}, r {s['lora_r']}, "
             f"{s['optimizer']}, system {s['system']}", "",
             "| component | GiB | % of allocated |", "|---|---:|---:|"]
    for name, b in est.components.items():
        lines.append(f"| {name} | {b / GIB:.3f} | {100 * b / alloc:.1f} |")
    lines += [f"| **allocated (torch allocator peak)** | **{est.allocated_gib:.2f}** | 100.0 |",
              f"| reserved (allocator cache) | {est.reserved_bytes / GIB:.2f} | |",
              f"| paged optimizer state (unified memory) | {est.paged_bytes / GIB:.2f} | |",
              f"| CUDA context | {CUDA_CONTEXT / GIB:.2f} | |",
              f"| **device total** | **{est.device_bytes / GIB:.2f} GiB = {est.total_gb:.2f} GB** | |"]
    lines += [f"\n- {n}" for n in est.notes]
    return "\n".join(lines)
