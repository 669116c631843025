"""Per-op cost primitives of a training step: FLOPs, bytes moved through device memory, kernel
launches and host calls, for one *instance* of an op (``Op.count`` instances per step).

Every count is a closed form of the shapes (hand-checkable; ``tests/benchmarks/speed/test_ops.py`` checks them
against hand-computed values for a small shape). ``b`` is the activation element size (2 for
bf16, 4 for fp32). Conventions:

* GEMM ``(m, k) @ (k, n)``: ``2 m k n`` FLOPs; bytes = operands read once + output written once
  (+ the output read again when it accumulates into an existing tensor, ``addmm_``). That is the
  lower bound the roofline needs: a tiled GEMM re-reads operands from L2, not HBM.
* NF4 dequantization of ``n`` elements: read ``n / 2`` packed bytes + the block scales (uint8 per
  ``blocksize`` with double quantization, fp32 without), write ``n`` elements of ``b`` bytes.
* Elementwise / reduction ops: elements read + written, times their element size.
* Attention (FlashAttention-2 / SDPA flash): ``4 B Hq T^2 D`` FLOPs forward (QK^T and PV), halved by
  the causal mask; backward 2.5x the forward (five T x T matmuls instead of two: recomputed QK^T,
  dV, dP, dQ, dK); bytes are q, k, v, o (and their gradients) once, the T x T never leaves SRAM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Kinds an op's GPU time is computed from (devices.py maps each to a peak and an efficiency).
KINDS = ("gemm", "gemm_fp32", "dequant", "dequant_bnb", "elementwise", "attention", "attention_fp32",
         "optimizer", "transfer", "host")
PHASES = ("forward", "recompute", "backward", "loss", "optimizer")


@dataclass(frozen=True)
class Op:
    """One kind of kernel call in a step, repeated ``count`` times (e.g. once per layer).

    ``flops`` / ``bytes``: per instance. ``launches``: GPU kernel launches per instance (each costs
    host time; the per-launch overhead term). ``host_calls``: heavy Python calls per instance
    (e.g. one bitsandbytes ``dequantize_4bit`` call: allocation, quant-state handling), costed with
    their own fitted overhead. ``phase``: where in the step (forward, recompute, backward, loss,
    optimizer)."""

    name: str
    kind: str
    phase: str
    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 1
    count: int = 1
    host_calls: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Op {self.name}: unknown kind {self.kind!r}")
        if self.phase not in PHASES:
            raise ValueError(f"Op {self.name}: unknown phase {self.phase!r}")

    def times(self, n: int) -> "Op":
        """The same op repeated ``n`` times as often."""
        return replace(self, count=self.count * n)

    @property
    def total_flops(self) -> float:
        return self.flops * self.count

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.count

    @property
    def total_launches(self) -> int:
        return self.launches * self.count


def gemm(name: str, phase: str, m: int, k: int, n: int, b: int, *, accumulate: bool = False,
         kind: str = "gemm", w_bytes: float | None = None, count: int = 1, launches: int = 1) -> Op:
    """(m, k) @ (k, n) -> (m, n). ``accumulate``: the output is read too (``addmm_``/``beta=1``).
    ``w_bytes``: bytes of the (k, n) operand when it is not ``b``-wide (a fused NF4 operand)."""
    w = k * n * b if w_bytes is None else w_bytes
    out = m * n * b * (2 if accumulate else 1)
    return Op(name, kind, phase, flops=2.0 * m * k * n, bytes=float(m * k * b + w + out),
              launches=launches, count=count)


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bytes an NF4 weight's storage occupies in reads: packed codes + block scales (+ the second
    level of scales, per 256 first-level ones, with double quantization)."""
    blocks = -(-numel // blocksize)
    scales = blocks * 1 + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return numel / 2 + scales


def dequant(name: str, phase: str, numel: int, b: int, *, blocksize: int = 64, double_quant: bool = True,
            kind: str = "dequant", launches: int = 1, host_calls: int = 0, count: int = 1) -> Op:
    """NF4 -> ``b``-byte dense copy of ``numel`` elements (one pass: read 4-bit + scales, write)."""
    return Op(name, kind, phase, bytes=nf4_bytes(numel, blocksize, double_quant) + numel * b,
              launches=launches, host_calls=host_calls, count=count)


def elementwise(name: str, phase: str, read: float, write: float, b: int, *, launches: int = 1,
                flops: float = 0.0, count: int = 1, kind: str = "elementwise") -> Op:
    """A memory-bound op reading ``read`` and writing ``write`` elements of ``b`` bytes."""
    return Op(name, kind, phase, flops=flops, bytes=float((read + write) * b), launches=launches, count=count)


def host(name: str, phase: str, launches: int, count: int = 1) -> Op:
    """Launches whose GPU work is negligible (tiny tensors, scalars): only their host cost counts."""
    return Op(name, "host", phase, launches=launches, count=count)


def attention_forward_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool = True) -> float:
    """QK^T and PV: 2 x (2 T^2 D) per head; the causal mask halves the useful work."""
    f = 4.0 * batch * heads * seq * seq * head_dim
    return f / 2 if causal else f


def attention(phase: str, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, b: int, *,
              backward: bool = False, launches: int = 1, count: int = 1, causal: bool = True) -> Op:
    """Flash attention over q (B, Hq, T, D), k/v (B, Hk, T, D). Forward: read q, k, v, write o and
    the fp32 logsumexp. Backward: read q, k, v, o, do, lse, write dq, dk, dv, and the fp32 dq
    accumulator (written and read once)."""
    q = batch * seq * heads * head_dim
    kv = batch * seq * kv_heads * head_dim
    lse = batch * heads * seq * 4
    f = attention_forward_flops(batch, seq, heads, head_dim, causal)
    if not backward:
        return Op("attention.fwd", "attention", phase, flops=f, bytes=float((2 * q + 2 * kv) * b + lse),
                  launches=launches, count=count)
    moved = (3 * q + 2 * kv) * b + lse + (q + 2 * kv) * b + 2 * q * 4
    return Op("attention.bwd", "attention", phase, flops=2.5 * f, bytes=float(moved), launches=launches,
              count=count)


def merge_ops(ops: list[Op]) -> list[Op]:
    """Ops with the same (name, kind, phase, flops, bytes, launches, host_calls) summed into one
    (their counts added), first occurrence order kept."""
    out: dict[tuple, Op] = {}
    for op in ops:
        key = (op.name, op.kind, op.phase, op.flops, op.bytes, op.launches, op.host_calls)
        out[key] = replace(out[key], count=out[key].count + op.count) if key in out else op
    return list(out.values())


__all__ = ["KINDS", "Op", "PHASES", "attention", "attention_forward_flops", "dequant", "elementwise", "gemm",
           "host", "merge_ops", "nf4_bytes"]
