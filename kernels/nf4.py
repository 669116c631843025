"""NF4 (4-bit NormalFloat, bitsandbytes layout) dequantization: Triton kernel or bitsandbytes.

A bitsandbytes ``Params4bit`` weight of logical shape (out, in) is stored as ``packed``
(ceil(out*in/2), 1) uint8 (two codes per byte, high nibble first) plus a ``QuantState``:
``absmax`` (one scale per ``blocksize`` elements; fp32, or uint8 with double quantization, then
``state2.absmax`` fp32 per 256 scales, ``state2.code`` (256,) and a scalar ``offset``), ``code``
(16,) the NF4 levels, ``shape`` and ``dtype``. Dequantized value of element i:

    W_flat[i] = code[nibble(i)] * absmax_f32[i // blocksize]                       (fp32, then cast)
    absmax_f32[b] = state2.code[absmax[b]] * state2.absmax[b // 256] + offset         (double quant)

:class:`NF4Weight` gathers those tensors once (no host sync), :func:`dequantize_nf4` dispatches,
:func:`dequantize_nf4_reference` is the same formula in plain torch (the CPU path and the test
oracle; the Triton kernel is bit-exact with it in fp32).

Our compute path never calls bitsandbytes' dequantization: its CPU kernel depends on the CPU's
features (on AVX512F it mis-indexes the block scales when ``in`` is not a multiple of the block
size, see docs/bitsandbytes-cpu.md), so the numbers would depend on the machine. bitsandbytes stays
the owner of the format, the quantization and the storage (``Params4bit``/``QuantState``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backend import resolve_backend


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality
class NF4Weight:
    """A frozen NF4 weight in bitsandbytes' layout, flattened for the kernels.

    packed: (ceil(n/2),) uint8. absmax: (ceil(n/blocksize),) uint8 if nested else fp32.
    code: (16,) fp32. code2: (256,) fp32, absmax2: (ceil(n_blocks/blocksize2),) fp32,
    offset: () fp32 — all three only when nested. shape: (out, in). dtype: the dequant dtype.
    quant_state: the original bitsandbytes ``QuantState`` (for the reference path).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    code2: torch.Tensor | None
    absmax2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_state: Any

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """Build from a ``Params4bit`` tensor (any quant_storage dtype) and its ``QuantState``."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"NF4Weight: quant_type {quant_state.quant_type!r} is not 'nf4'")
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        nested = bool(quant_state.nested)
        s2 = quant_state.state2 if nested else None
        offset = quant_state.offset if nested else None
        if offset is not None:
            offset = torch.as_tensor(offset, dtype=torch.float32, device=flat.device).reshape(())
        return cls(
            packed=flat,
            absmax=quant_state.absmax.reshape(-1),
            code=quant_state.code.to(torch.float32),
            code2=s2.code.to(torch.float32) if nested else None,
            absmax2=s2.absmax.to(torch.float32).reshape(-1) if nested else None,
            offset=offset,
            blocksize=int(quant_state.blocksize),
            blocksize2=int(s2.blocksize) if nested else 256,
            shape=tuple(quant_state.shape),
            dtype=quant_state.dtype,
            quant_state=quant_state,
        )

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def block_scales(w: NF4Weight) -> torch.Tensor:
    """The fp32 scale of every quantization block (ceil(n/blocksize),), double-quant aware:
    ``code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset`` (a multiply, then an add: the same
    two roundings as bitsandbytes and the Triton kernel). Decoded once per weight: one 256-entry
    gather, the second-level scales broadcast per group of ``blocksize2`` (no index tensor)."""
    if w.code2 is None:
        return w.absmax.float()
    n_blocks, bs2 = w.absmax.numel(), w.blocksize2
    groups = -(-n_blocks // bs2)
    scale = torch.empty(groups * bs2, dtype=torch.float32, device=w.absmax.device)
    torch.index_select(w.code2, 0, w.absmax.int(), out=scale[:n_blocks])
    grouped = scale.view(groups, bs2)
    grouped.mul_(w.absmax2[:groups, None])
    return grouped.view(-1)[:n_blocks].add_(w.offset)


def nf4_pair_table(code: torch.Tensor) -> torch.Tensor:
    """The values of both nibbles of every byte: (256,) int64 whose bytes are the fp32 pair
    ``(code[b >> 4], code[b & 15])`` (high nibble first, the storage order), so that one 1-D gather
    per packed byte yields two consecutive fp32 elements (``.view(torch.float32)``)."""
    b = torch.arange(256, device=code.device)
    return torch.stack((code[b >> 4], code[b & 15]), dim=1).view(torch.int64).reshape(256)


# Packed bytes per pass of the reference: its int32 indices (512 KiB) and fp32 values (1 MiB) stay
# in a core's L2 and are reused across passes, so only the output is allocated per call.
REF_CHUNK_BYTES = 1 << 17


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch NF4 dequantization: (out, in) in ``dtype`` (default: the quant state's).

    ``W_flat[i] = code[nibble(i)] * scale[i // blocksize]`` in fp32, one rounding to ``dtype``.
    Independent of the CPU's features; per pass of whole blocks (:data:`REF_CHUNK_BYTES` packed
    bytes): the bytes widened to int32, one 1-D gather per byte from :func:`nf4_pair_table` (both
    nibbles at once) written straight into the fp32 values, the block scales (decoded once)
    applied in one in-place broadcast multiply, and for a 16-bit ``dtype`` one cast into the
    result. ``out``: a contiguous (out, in) tensor to write into (its dtype wins); returned.
    Extra memory: 1.5 MiB of reused buffers (plus one padded copy of W when the element count is
    not a whole number of blocks)."""
    dtype = out.dtype if out is not None else dtype or w.dtype
    n, bs = w.numel, w.blocksize
    n_blocks = -(-n // bs)
    n_bytes = n_blocks * bs // 2  # whole blocks (blocksize is even), so the scale broadcasts per row
    q = w.packed[: (n + 1) // 2]
    if q.numel() < n_bytes:
        q = torch.nn.functional.pad(q, (0, n_bytes - q.numel()))
    table, scale = nf4_pair_table(w.code), block_scales(w)
    whole = out is not None and 2 * n_bytes == n and out.is_contiguous()
    res = out.view(-1) if whole else torch.empty(2 * n_bytes, dtype=dtype, device=q.device)
    step = max(1, REF_CHUNK_BYTES // (bs // 2)) * (bs // 2)  # whole blocks per pass
    idx = torch.empty(min(step, n_bytes), dtype=torch.int32, device=q.device)
    fp32 = dtype == torch.float32
    pairs = None if fp32 else torch.empty(min(step, n_bytes), dtype=torch.int64, device=q.device)
    for b0 in range(0, n_bytes, step):
        b1 = min(b0 + step, n_bytes)
        i = idx[: b1 - b0].copy_(q[b0:b1])
        dst = res[2 * b0:2 * b1].view(torch.int64) if fp32 else pairs[: b1 - b0]
        vals = torch.index_select(table, 0, i, out=dst).view(torch.float32).view(-1, bs)
        vals.mul_(scale[2 * b0 // bs:2 * b1 // bs, None])
        if not fp32:
            res[2 * b0:2 * b1].copy_(vals.view(-1))
    if whole:
        return out
    res = res[:n].view(w.shape)
    return res if out is None else out.copy_(res)


MAX_GROUP = 3  # members one grouped decode takes (q/k/v): the Triton kernel's pointer slots


def nf4_groupable(ws: Sequence[NF4Weight]) -> bool:
    """Whether :func:`dequantize_nf4_group` decodes ``ws`` in one call: 1..MAX_GROUP members with
    one blocksize, second-level blocksize, nesting and input size."""
    return 1 <= len(ws) <= MAX_GROUP and len({(w.blocksize, w.blocksize2, w.code2 is None, w.shape[1])
                                              for w in ws}) == 1


def dequantize_nf4_group(ws: Sequence[NF4Weight], out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dequantize the members ``ws`` (weights (o_i, in) stacked along the output axis, e.g. q/k/v;
    :func:`nf4_groupable`) into ``out`` ((sum o_i, in) contiguous, its dtype) in one call: one
    Triton launch (``nf4_dequant_group``), or the reference member by member into the rows (a
    grouped reference pass measured no fewer aten ops: 45 vs 45 for q/k/v, 32 vs 30 for gate/up,
    the per-member nibble and scale preparation dominates). Returns ``out``."""
    if not nf4_groupable(ws):
        raise ValueError(f"dequantize_nf4_group: {len(ws)} members not groupable (1..{MAX_GROUP}, one blocksize, "
                         f"nesting and in)")
    if resolve_backend(backend, ws[0].packed.device, "nf4_dequant") == "triton":
        from ._triton_nf4 import nf4_dequant_group

        return nf4_dequant_group(ws, out)
    for w, rows in zip(ws, out.split([w.shape[0] for w in ws])):
        dequantize_nf4(w, backend="torch", out=rows)
    return out


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto",
                   out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Dequantize ``w`` to a new (out, in) tensor in ``dtype`` (default: the quant state's dtype).

    ``backend``: ``auto|triton|torch`` (torch = :func:`dequantize_nf4_reference`). The Triton kernel writes
    ``dtype`` directly (fp32 math, one rounding), so bf16 output costs no extra pass.
    ``out``: a contiguous (out, in) tensor of ``dtype`` to write into (e.g. rows of a group's
    concatenated weight); returned. ``rows`` (r0, r1): only W[r0:r1] (r1 - r0, in); ``r0 * in``
    must be a multiple of the blocksize (:func:`row_step_for`), so the rows are whole blocks."""
    dtype = out.dtype if out is not None else dtype or w.dtype
    if resolve_backend(backend, w.packed.device, "nf4_dequant") == "triton":
        from ._triton_nf4 import nf4_dequant

        return nf4_dequant(w.packed, w.absmax, w.code, w.code2, w.absmax2, w.offset,
                           w.blocksize, w.blocksize2, w.shape, dtype, out=out, rows=rows)
    if rows is None:
        return dequantize_nf4_reference(w, dtype, out=out)
    res = dequantize_nf4_reference(w, dtype)[rows[0]:rows[1]]
    return res if out is None else out.copy_(res)


def gemm_supported(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether the large-M NF4 GEMMs (``_triton_nf4_gemm.py``) take an (out, in) weight: ``in``
    even (no byte spans two rows) and a power-of-two blocksize >= 64 (every tile config divides it)."""
    return len(shape) == 2 and shape[1] % 2 == 0 and blocksize >= 64 and blocksize & (blocksize - 1) == 0


def row_step_for(in_features: int, blocksize: int) -> int:
    """The smallest row count r with ``r * in_features`` a multiple of the blocksize: row ranges
    starting at multiples of it are contiguous whole-block ranges of the flat NF4 storage."""
    return blocksize // math.gcd(in_features, blocksize)
