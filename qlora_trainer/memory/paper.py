"""The QLoRA paper's memory breakdown (LLaMA 7B-65B, bs 1, seq 512, r 64, paged AdamW 32-bit, all
linear layers, gradient checkpointing) next to the HF stack measured on an H100 and our estimates.

Units in every row are labelled: paper figures in MB/GB (1e6/1e9 B), allocated peaks in GiB.
"""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.errors import QloraError
from qlora_trainer.memory.estimate import GB, GIB, estimate
from qlora_trainer.memory.references import PAPER_ROWS, PAPER_SETTINGS
from qlora_trainer.models.catalog import get_arch, param_counts
from qlora_trainer.io import atomic_write_bytes, starts_with

# Chart groups: estimate components -> the paper's four bars.
GROUPS = {
    "base model": ("base_nf4", "quant_constants", "embeddings", "lm_head", "norms_biases"),
    "adapters": ("lora_params", "lora_grads"),
    "optimizer": ("optimizer_states",),
    "activations": ("checkpoints", "layer_recompute", "activations", "attention_workspace",
                    "dequant_workspace", "logits_loss"),
}


def paper_base_bytes(arch) -> int:
    """The paper's "base model" bytes: NF4 codes + DQ constants of the linears, embeddings and
    lm_head at 6 B/param (the fp32 copy PEFT makes plus the 16-bit copy it was cast from, which the
    caching allocator keeps reserved), norms in fp32. Our reading of the figure; within 3% of all four."""
    est = estimate(arch, system="hf", **PAPER_SETTINGS)
    c = param_counts(arch)
    return est.components["base_nf4"] + est.components["quant_constants"] + 6 * (c["embed"] + c["lm_head"]) \
        + 4 * c["norms"]


def paper_table() -> list[dict]:
    """One dict per LLaMA size with the paper's, the HF stack's and our estimated figures."""
    rows = []
    for ref in PAPER_ROWS:
        arch = get_arch(ref.arch)
        hf = estimate(arch, system="hf", **PAPER_SETTINGS)
        ours = estimate(arch, system="ours", **PAPER_SETTINGS)
        rows.append({
            "model": ref.arch,
            "paper_base_mb": ref.paper_base_mb,
            "est_base_mb": round(paper_base_bytes(arch) / 1e6),
            "paper_total_gb": ref.paper_total_gb,
            "hf_reserved_gb": ref.hf_reserved_gb,
            "est_hf_reserved_gb": round(hf.reserved_bytes / GB, 2),
            "hf_allocated_gib": ref.hf_allocated_gib,
            "est_hf_allocated_gib": round(hf.allocated_gib, 2),
            "est_ours_allocated_gib": round(ours.allocated_gib, 2),
            "est_ours_device_gb": round(ours.total_gb, 2),
            "groups_hf_gib": _groups(hf), "groups_ours_gib": _groups(ours),
        })
    return rows


def _groups(est) -> dict[str, float]:
    g = {k: sum(est.components.get(c, 0) for c in cs) / GIB for k, cs in GROUPS.items()}
    g["optimizer (paged)"] = est.paged_bytes / GIB
    return {k: round(v, 3) for k, v in g.items()}


def paper_markdown(rows: list[dict]) -> str:
    head = ("| model | paper base MB | est. base MB | paper total GB | HF reserved GB | est. HF reserved GB "
            "| HF allocated GiB | est. HF allocated GiB | est. ours allocated GiB | est. ours device GB |")
    lines = [head, "|---" + "|---:" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['paper_base_mb']:,.0f} | {r['est_base_mb']:,} | {r['paper_total_gb']}"
                     f" | {r['hf_reserved_gb']} | {r['est_hf_reserved_gb']} | {r['hf_allocated_gib']}"
                     f" | {r['est_hf_allocated_gib']} | {r['est_ours_allocated_gib']} | {r['est_ours_device_gb']} |")
    lines += ["", "Settings: batch 1, seq 512, LoRA r 64 (alpha 16) on all linear layers, paged AdamW 32-bit, "
              "gradient checkpointing. *allocated* = torch allocator peak (no CUDA context, no paged optimizer "
              "state); *reserved* adds the allocator cache; *device* adds paged state and the CUDA context."]
    return "\n".join(lines)


CHART_CREATOR = "qlora-trainer memory-table"  # in each chart's metadata: what --overwrite may replace
CHART_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".svg": b"<?xml", ".pdf": b"%PDF-"}


def is_chart(path: Path) -> bool:
    """Whether ``path`` is a chart :func:`paper_chart` wrote: its format's magic bytes, our creator tag."""
    magic = CHART_MAGIC.get(Path(path).suffix.lower())
    return magic is not None and starts_with(magic, CHART_CREATOR.encode())(path)


def paper_chart(rows: list[dict], path: str) -> None:
    """Stacked bars (GiB) per model: HF-profile and ours estimates side by side, the measured HF
    allocated peak as a marker. Written atomically."""
    import io

    try:
        import matplotlib
    except ImportError:
        raise QloraError("the chart needs matplotlib: pip install 'qlora-trainer[notebooks]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(GROUPS) + ["optimizer (paged)"]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"]
    for i, r in enumerate(rows):
        for off, key, hatch in ((-0.2, "groups_hf_gib", ""), (0.2, "groups_ours_gib", "//")):
            bottom = 0.0
            for n, c in zip(names, colors):
                v = r[key][n]
                ax.bar(i + off, v, 0.38, bottom=bottom, color=c, hatch=hatch,
                       label=n if (i == 0 and off < 0) else None)
                bottom += v
        ax.plot(i - 0.2, r["hf_allocated_gib"], "k_", markersize=22,
                label="HF measured (allocated)" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\nHF | ours" for r in rows])
    ax.set_ylabel("GiB (estimated; paged state outside allocator)")
    ax.set_title("QLoRA memory, bs 1, seq 512, r 64, paged AdamW 32-bit")
    ax.bar(0, 0, 0, color="white", edgecolor="black", hatch="//", label="ours (hatched); plain = HF")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else "png"
    fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight",
                metadata={"Software" if fmt == "png" else "Creator": CHART_CREATOR})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
