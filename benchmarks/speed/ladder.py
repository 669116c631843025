"""The predicted ours/HF ratio today and after each speed optimisation (issue 16 / 20): one table per
shape, generated here so that docs/speed-model.md cannot drift from the model.

``python -m benchmarks.speed.ladder [--gpu h100]`` prints the markdown tables. Each row adds one
option to the row above (cumulative); "alone" is the issue-16 baseline plus that option only. The
baseline is our trainer before issue 16 (every layer checkpointed, every projection its own dequant
and GEMM, the recompute running down_proj). HF is predicted by the same model, so the ratio is a
prediction of a prediction: the measured HF step differs (docs/speed-model.md, leave-one-out).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from benchmarks.speed.recipes import StepOptions
from benchmarks.speed.report import StepPrediction, hf_options, predict


@dataclass(frozen=True)
class Rung:
    """One optimisation: its label, the :class:`StepOptions` fields it sets, and its ``status``:
    ``on`` (built, on by default), ``off`` (built, off by default: unmeasured) or ``model`` (not
    built, modelled only)."""

    label: str
    fields: dict
    status: str


BASELINE = dict(skip_down_recompute=False, fused_qkv=False, fused_gate_up=False, fused_dequant_gemm=False,
                cuda_graphs=False, ckpt_layers=None, fused_add_norm=False)
AUTO_CKPT = "checkpoint_layers=auto"  # fields filled per shape and GPU from the memory plan
RUNGS = (
    Rung("recompute skips down_proj (`recompute_skips_base`)", dict(skip_down_recompute=True), "on"),
    Rung("grouped q/k/v and gate/up (`performance.group_projections`)", dict(fused_qkv=True, fused_gate_up=True), "on"),
    Rung("fused residual add + RMSNorm (`performance.fused_add_norm`)", dict(fused_add_norm=True), "on"),
    Rung(f"`performance.{AUTO_CKPT}` (plan for the GPU's memory)", {AUTO_CKPT: True}, "on"),
    Rung("decoder layers as CUDA graphs (`performance.compile: reduce-overhead`)", dict(compile="reduce-overhead"), "off"),
    # the code groups only on the dequant path, so the fused GEMM gives grouping up
    Rung("NF4 decoded inside the GEMM at every M (`performance.nf4_matmul: fused`; ungrouped)",
         dict(fused_dequant_gemm=True, fused_qkv=False, fused_gate_up=False), "off"),
    Rung("the whole step replayed as one CUDA graph", dict(cuda_graphs=True), "model"),
)
SHAPES = (("llama-3-8b", 2048), ("llama-2-7b", 512))


def planned_layers(model: str, seq_len: int, gpu: str) -> int:
    """Layers ``performance.checkpoint_layers=auto`` checkpoints for the benchmark settings on ``gpu``."""
    from qlora_trainer.config import Config
    from qlora_trainer.memory.checkpoint_plan import plan_checkpoint_layers
    from qlora_trainer.models.catalog import get_arch
    from benchmarks.speed.devices import get_device

    cfg = Config()
    cfg.model.name_or_path, cfg.data.seq_len, cfg.lora.dropout = model, seq_len, 0.0
    n = plan_checkpoint_layers(cfg, get_device(gpu).memory_bytes)
    return get_arch(model).layers if n is None else n


def _apply(o: StepOptions, fields: dict, model: str, gpu: str) -> StepOptions:
    if fields.get(AUTO_CKPT):
        return replace(o, ckpt_layers=planned_layers(model, o.seq_len, gpu))
    return replace(o, **fields)


def ladder(model: str, seq_len: int, gpu: str = "h100") -> list[tuple[str, StepPrediction, StepPrediction | None]]:
    """[(label, cumulative prediction, alone prediction or None)], first row HF, second the baseline."""
    from qlora_trainer.models.catalog import get_arch

    arch = get_arch(model)
    base = StepOptions(seq_len=seq_len, **BASELINE)
    rows = [("HF stack", predict(arch, hf_options(base), gpu), None), ("ours before issue 16", predict(arch, base, gpu), None)]
    cum = base
    for rung in RUNGS:
        cum = _apply(cum, rung.fields, model, gpu)
        tag = {"on": "", "off": " (built, off by default)", "model": " (not built)"}[rung.status]
        rows.append((f"+ {rung.label}{tag}", predict(arch, cum, gpu),
                     predict(arch, _apply(base, rung.fields, model, gpu), gpu)))
    return rows


def markdown(model: str, seq_len: int, gpu: str = "h100") -> str:
    """One shape's table: step s, tok/s, ours/HF, alone, launches, dequantizations, bound."""
    rows = ladder(model, seq_len, gpu)
    hf = rows[0][1].seconds
    out = [f"| {model} / {seq_len} on {gpu} | step s | tok/s | ours/HF | alone | launches | dequants | bound |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, p, alone in rows:
        ratio = "" if label == "HF stack" else f"{hf / p.seconds:.2f}x"
        solo = "" if alone is None else f"{hf / alone.seconds:.2f}x"
        out.append(f"| {label} | {p.seconds:.3f} | {p.tokens_per_s:,.0f} | {ratio} | {solo} | {p.launches:,} | "
                   f"{p.dequants:,} | {p.bound.split()[0]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.ladder", description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", default="h100")
    a = ap.parse_args(argv)
    print("\n\n".join(markdown(m, s, a.gpu) for m, s in SHAPES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
