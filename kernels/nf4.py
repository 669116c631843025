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
    two roundings as bitsandbytes and the Triton kernel)."""
    if w.code2 is None:
        return w.absmax.float()
    blk2 = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.blocksize2
    return w.code2[w.absmax.long()] * w.absmax2[blk2] + w.offset


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch NF4 dequantization: (out, in) in ``dtype`` (default: the quant state's).

    ``W_flat[i] = code[nibble(i)] * scale[i // blocksize]`` in fp32, one rounding to ``dtype``.
    Extra memory: the nibble indices (int64) and the fp32 result, one layer at a time (the CPU
    path; CUDA uses the Triton kernel)."""
    n = w.numel
    q = w.packed[: (n + 1) // 2]
    codes = torch.stack((q >> 4, q & 15), dim=1).reshape(-1).long()  # (2 * bytes,) nibble per element
    scale = block_scales(w)  # (n_blocks,)
    n_pad = scale.numel() * w.blocksize  # whole blocks, so the scale broadcasts per row
    codes = torch.nn.functional.pad(codes[:n], (0, n_pad - n))
    out = w.code[codes].view(-1, w.blocksize).mul_(scale[:, None]).view(-1)[:n]
    return out.reshape(w.shape).to(dtype or w.dtype)


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
    res = dequantize_nf4_reference(w, dtype)
    if rows is not None:
        res = res[rows[0]:rows[1]]
    return res if out is None else out.copy_(res)


def gemm_supported(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether the large-M NF4 GEMMs (``_triton_nf4_gemm.py``) take an (out, in) weight: ``in``
    even (no byte spans two rows) and a power-of-two blocksize >= 64 (every tile config divides it)."""
    return len(shape) == 2 and shape[1] % 2 == 0 and blocksize >= 64 and blocksize & (blocksize - 1) == 0


def row_step_for(in_features: int, blocksize: int) -> int:
    """The smallest row count r with ``r * in_features`` a multiple of the blocksize: row ranges
    starting at multiples of it are contiguous whole-block ranges of the flat NF4 storage."""
    return blocksize // math.gcd(in_features, blocksize)
