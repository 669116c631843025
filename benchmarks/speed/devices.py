"""GPU table and efficiency factors: turn an op's FLOPs, bytes and launches into seconds.

Peaks are the vendors' datasheet figures (dense, no sparsity): bf16 tensor-core TFLOP/s with fp32
accumulation, fp32 non-tensor TFLOP/s (PyTorch's default matmul precision: TF32 off), memory
bandwidth and the PCIe link (x16, one direction, usable). Achieved = peak x an efficiency factor.

Per op instance (``Op``): ``gpu = max(flops / (peak_kind * eff_kind), bytes / (hbm * eff_mem_kind))``
and ``host = launches * launch_us + host_calls * call_us(kind)``. Between host-device syncs the
host enqueues kernels ahead of the GPU, so such a stretch takes ``max(sum gpu, sum host)``: the
forward + loss + recompute + backward is one stretch, the optimizer another (``report.SEGMENTS``).

Which constants are fitted and which are assumed is recorded in :data:`FITTED` (see
``calibrate.py`` and docs/speed-model.md): on the H100 the GEMM efficiency and bitsandbytes'
dequantization (bandwidth and per-call cost) are fitted to profiled components, the per-launch
host cost to the four HF-stack step times; everything else is an assumption, and every other GPU
uses the H100's factors (predicted, not measured).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from benchmarks.speed.ops import Op


@dataclass(frozen=True)
class Device:
    """One GPU: datasheet peaks (TFLOP/s, GB/s = 1e9 B/s) and memory as marketed ("80 GB" cards
    expose 80 GiB = 2**30 B units, like ``torch.cuda.get_device_properties``)."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbs: float
    pcie_gbs: float
    memory_gb: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)


DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("h100", bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbs=3350.0, pcie_gbs=55.0, memory_gb=80.0),   # SXM5
    Device("h200", bf16_tflops=989.0, fp32_tflops=67.0, hbm_gbs=4800.0, pcie_gbs=55.0, memory_gb=141.0),
    Device("a100", bf16_tflops=312.0, fp32_tflops=19.5, hbm_gbs=2039.0, pcie_gbs=25.0, memory_gb=80.0),   # 80 GB SXM4
    Device("l40s", bf16_tflops=362.0, fp32_tflops=91.6, hbm_gbs=864.0, pcie_gbs=25.0, memory_gb=48.0),
    Device("rtx4090", bf16_tflops=165.0, fp32_tflops=82.6, hbm_gbs=1008.0, pcie_gbs=25.0, memory_gb=24.0),
    Device("rtx3090", bf16_tflops=71.0, fp32_tflops=35.6, hbm_gbs=936.0, pcie_gbs=25.0, memory_gb=24.0),
]}
ALIASES = {"h100-sxm": "h100", "a100-80gb": "a100", "4090": "rtx4090", "3090": "rtx3090"}


def get_device(name: str) -> Device:
    """Device by name (case-insensitive; aliases such as ``4090``), or a one-line error."""
    from qlora_trainer.errors import ConfigError

    key = ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; choose from {', '.join(DEVICES)}")
    return DEVICES[key]


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak per op kind, and host costs in microseconds.

    gemm: bf16 cuBLAS GEMMs. gemm_fp32: fp32 (TF32 off) GEMMs. attention: flash attention (bf16);
    attention_fp32: SDPA's memory-efficient kernel in fp32 (the HF stack's fp32 q/k/v). mem:
    elementwise/reduction kernels. dequant: our Triton NF4 dequant; dequant_bnb: bitsandbytes'.
    fused_gemm: an NF4-decoding Triton GEMM relative to cuBLAS (planned, not built). launch_us:
    host time per kernel launch (eager PyTorch dispatch + autograd + Python). bnb_call_us: GPU time
    per bitsandbytes dequantize_4bit call beyond its bandwidth term (its absmax kernels, tails);
    bnb_host_us: that call's Python cost beyond its launches; opt_param_us: per parameter tensor in bitsandbytes' optimizer
    loop. graph_launch_us: per kernel inside a replayed CUDA graph. compiled_launch_us: per kernel
    launched by torch.compile's generated code (no dispatcher or autograd per op; assumed).
    ours_launch_us: our trainer's
    host time per launch once our own step rows have been measured (None: ``launch_us``, which is
    fitted on the HF stack, whose PEFT/bitsandbytes modules add Python per op)."""

    gemm: float = 0.73
    gemm_fp32: float = 0.70
    attention: float = 0.40
    attention_fp32: float = 0.60
    mem: float = 0.80
    dequant: float = 0.60
    dequant_bnb: float = 0.38
    fused_gemm: float = 0.80
    transfer: float = 0.80
    launch_us: float = 12.0
    ours_launch_us: float | None = None
    bnb_call_us: float = 29.0
    bnb_host_us: float = 10.0
    opt_param_us: float = 15.0
    graph_launch_us: float = 1.0
    compiled_launch_us: float = 5.0

    def with_(self, **kw: float) -> "Efficiency":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Which Efficiency fields are fitted to measurements (calibrate.py), and to what; the rest are
# assumptions (typical achieved fractions on Hopper, not measured in this repository).
FITTED = {
    "gemm": "H100 profile: linear GEMMs 0.119 s (8B/2048), 0.029 s (7B/512)",
    "dequant_bnb": "H100 profile: bitsandbytes dequant x3 0.061 s (8B/2048), 0.058 s (7B/512)",
    "bnb_call_us": "same two dequant figures (bandwidth + per-call cost, two equations)",
    "launch_us": "the four HF-stack step times (least squares in log space)",
    "ours_launch_us": "our step rows in benchmarks/results/*.json, when there are any",
}


def op_seconds(op: Op, dev: Device, eff: Efficiency, *, cuda_graphs: bool = False,
               system: str = "hf", compiled: bool = False) -> tuple[float, float]:
    """(GPU seconds, host seconds) of one instance of ``op`` of ``system`` (hf | ours) on ``dev``;
    ``cuda_graphs``: replayed in a CUDA graph; ``compiled``: launched by torch.compile's code."""
    hbm = dev.hbm_gbs * 1e9
    if op.kind == "host":
        gpu = 0.0
    elif op.kind == "transfer":
        gpu = op.bytes / (dev.pcie_gbs * 1e9 * eff.transfer)
    else:
        peak, f_eff, m_eff = {
            "gemm": (dev.bf16_tflops, eff.gemm, eff.mem),
            "gemm_fp32": (dev.fp32_tflops, eff.gemm_fp32, eff.mem),
            "attention": (dev.bf16_tflops, eff.attention, eff.mem),
            "attention_fp32": (dev.fp32_tflops, eff.attention_fp32, eff.mem),
            "dequant": (dev.bf16_tflops, 1.0, eff.dequant),
            "dequant_bnb": (dev.bf16_tflops, 1.0, eff.dequant_bnb),
            "elementwise": (dev.fp32_tflops, 1.0, eff.mem),
            "optimizer": (dev.fp32_tflops, 1.0, eff.mem),
        }[op.kind]
        if op.name.endswith(".fused"):
            f_eff *= eff.fused_gemm
        gpu = max(op.flops / (peak * 1e12 * f_eff), op.bytes / (hbm * m_eff))
        if op.kind == "dequant_bnb":
            gpu += op.host_calls * eff.bnb_call_us * 1e-6
    launch = eff.ours_launch_us if system == "ours" and eff.ours_launch_us is not None else eff.launch_us
    per_launch = eff.graph_launch_us if cuda_graphs else eff.compiled_launch_us if compiled else launch
    call = {"dequant_bnb": eff.bnb_host_us, "optimizer": eff.opt_param_us}.get(op.kind, 0.0)
    host = (op.launches * per_launch + (0.0 if cuda_graphs else op.host_calls * call)) * 1e-6
    return gpu, host


__all__ = ["ALIASES", "DEVICES", "Device", "Efficiency", "FITTED", "get_device", "op_seconds"]
