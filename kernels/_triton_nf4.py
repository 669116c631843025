"""Triton NF4 dequantization kernel and launcher (imported lazily by ``nf4.py``; needs triton).

Layout (bitsandbytes ``quantize_4bit``, identical on CPU and CUDA): the weight (out, in) is
flattened row-major; element ``i`` lives in byte ``i // 2`` (high nibble for even ``i``, low nibble
for odd ``i``) and is scaled by ``absmax[i // blocksize]``. With double quantization the absmax is
itself 8-bit: ``absmax_f32[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset``.

One program per ``BLOCK_BYTES`` packed bytes (2 * BLOCK_BYTES outputs): a coalesced uint8 load,
two 16-entry table lookups (L1-resident), one absmax lookup per quantization block (1 byte with
DQ), an interleave, and a coalesced 16-byte-vector store. Bytes moved = n/2 (packed) + n*2 (bf16 out) + n/blocksize
(absmax): the floor for a separate dequant; FMA contraction is disabled so that the double-quant
absmax (mul then add) rounds exactly as bitsandbytes does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def nf4_block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, mask, NESTED: tl.constexpr,
                    QBLOCK2: tl.constexpr):
    """fp32 absmax of quantization block(s) ``blk`` (double-quant aware)."""
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(CODE2 + a8, mask=mask, other=0.0) * tl.load(ABSMAX2 + blk // QBLOCK2, mask=mask, other=0.0)
        return s + tl.load(OFFSET)
    return tl.load(ABSMAX + blk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _nf4_dequant_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tile, blk0, numel, n_bytes, n_blocks,
                      QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                      BLOCK_BYTES: tl.constexpr):
    """Decode tile ``tile`` (BLOCK_BYTES packed bytes) of one weight into OUT[0:numel], counting
    blocks from ``blk0`` (a row range: OUT holds the elements from blk0 * QBLOCK on; masks absolute)."""
    # The tile is (ROWS, HALF): one row per quantization block (HALF = QBLOCK / 2 packed bytes),
    # so the block scale is loaded once per row and broadcast, and the byte loads are contiguous
    # with a mask that is constant over 16-byte groups (vectorized when n_bytes % 16 == 0).
    HALF: tl.constexpr = QBLOCK // 2
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    blk = blk0 + tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    q = tl.load(PACKED + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    scale = nf4_block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, blk < n_blocks, NESTED, QBLOCK2)
    hi = tl.load(CODE + (q >> 4)) * scale[:, None]  # element 2*byte
    lo = tl.load(CODE + (q & 15)) * scale[:, None]  # element 2*byte + 1 (same block: QBLOCK even)
    vals = tl.interleave(hi, lo)  # (ROWS, QBLOCK) fp32, row-major = flat element order
    idx = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(OUT + (idx - blk0 * QBLOCK), vals.to(OUT.dtype.element_ty), mask=idx < numel)


@triton.jit
def _nf4_dequant_kernel(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, numel, n_bytes, n_blocks, blk0,
                        QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                        BLOCK_BYTES: tl.constexpr):
    _nf4_dequant_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tl.program_id(0), blk0, numel, n_bytes,
                      n_blocks, QBLOCK, QBLOCK2, NESTED, BLOCK_BYTES)


@triton.jit
def _nf4_member_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tile, numel,
                     QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                     BLOCK_BYTES: tl.constexpr):
    _nf4_dequant_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, tile, 0, numel, (numel + 1) // 2,
                      (numel + QBLOCK - 1) // QBLOCK, QBLOCK, QBLOCK2, NESTED, BLOCK_BYTES)


@triton.jit
def _nf4_dequant_group_kernel(OUT,
                              P0, A0, C0, D0, S0, F0, N0,
                              P1, A1, C1, D1, S1, F1, N1, E1, T1,
                              P2, A2, C2, D2, S2, F2, N2, E2, T2,
                              MEMBERS: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                              NESTED: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # Member i: packed P_i, absmax A_i, code C_i, code2 D_i, absmax2 S_i, offset F_i, N_i elements,
    # written at OUT + E_i (E_0 = 0), tiles T_i .. T_{i+1} - 1 of the grid (T_0 = 0). One scalar
    # branch per program picks its member; each member's tiles run the single-weight tile code.
    pid = tl.program_id(0)
    if MEMBERS == 1 or pid < T1:
        _nf4_member_tile(P0, A0, C0, D0, S0, F0, OUT, pid, N0, QBLOCK, QBLOCK2, NESTED, BLOCK_BYTES)
    elif MEMBERS == 2 or pid < T2:
        _nf4_member_tile(P1, A1, C1, D1, S1, F1, OUT + E1, pid - T1, N1, QBLOCK, QBLOCK2, NESTED, BLOCK_BYTES)
    else:
        _nf4_member_tile(P2, A2, C2, D2, S2, F2, OUT + E2, pid - T2, N2, QBLOCK, QBLOCK2, NESTED, BLOCK_BYTES)


def _block_bytes(blocksize: int) -> int:
    return max(1024, blocksize // 2)  # a whole number of quantization blocks per program


def nf4_dequant(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                code2: torch.Tensor | None, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
                blocksize: int, blocksize2: int, shape: tuple[int, ...], dtype: torch.dtype,
                out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """packed: (ceil(n/2),) uint8; absmax: (ceil(n/blocksize),) uint8 (nested) or fp32;
    code: (16,) fp32; code2/absmax2/offset: (256,) / (ceil(n_blocks/blocksize2),) / () fp32 when
    nested (``offset`` stays on the device: no host sync).
    Returns a new contiguous tensor of ``shape`` in ``dtype``, or writes ``out`` (contiguous, that
    shape and dtype) and returns it. ``rows`` (r0, r1): only W[r0:r1] (r1 - r0, in), when
    ``r0 * in`` is a multiple of ``blocksize`` (a row range is then a contiguous range of blocks)."""
    blk0 = 0
    if rows is not None:
        r0, r1 = rows
        if (r0 * shape[1]) % blocksize or not 0 <= r0 < r1 <= shape[0]:
            raise ValueError(f"nf4_dequant: rows {rows} of {tuple(shape)} do not start on a block of {blocksize}")
        blk0, shape = r0 * shape[1] // blocksize, (r1 - r0, shape[1])
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4_dequant: out is {tuple(out.shape)} {out.dtype}, needs contiguous {tuple(shape)} {dtype}")
    numel = out.numel() + blk0 * blocksize  # end element (the masks are absolute)
    nested = code2 is not None
    block_bytes = _block_bytes(blocksize)
    n_bytes = (numel + 1) // 2
    n_blocks = triton.cdiv(numel, blocksize)
    grid = (triton.cdiv(n_bytes - blk0 * blocksize // 2, block_bytes),)
    dummy = code  # unused pointer arguments when not nested
    _nf4_dequant_kernel[grid](
        packed, absmax, code, code2 if nested else dummy, absmax2 if nested else dummy,
        offset if nested else dummy, out, numel, n_bytes, n_blocks, blk0, QBLOCK=blocksize,
        QBLOCK2=blocksize2, NESTED=nested, BLOCK_BYTES=block_bytes, num_warps=4, enable_fp_fusion=False,
    )
    return out


GROUP_SLOTS = 3  # member slots of _nf4_dequant_group_kernel (nf4.MAX_GROUP: the most a group may have)


def nf4_dequant_group(weights: Sequence[Any], out: torch.Tensor) -> torch.Tensor:
    """Decode ``weights`` (NF4Weight-like: packed, absmax, code, code2, absmax2, offset, blocksize,
    blocksize2, shape; 1..3 of them, one blocksize, blocksize2 and nesting, equal ``in``) into the
    rows of ``out`` ((sum o_i, in) contiguous, any float dtype) in ONE launch: member i's (o_i, in)
    lands in rows sum_{j<i} o_j onward. Each element is computed as :func:`nf4_dequant` computes
    it (bit-identical). The packed weights are read where they are (no concatenated copy)."""
    k, first = len(weights), weights[0]  # groupable: checked by the caller (nf4.dequantize_nf4_group)
    rows = sum(w.shape[0] for w in weights)
    if tuple(out.shape) != (rows, first.shape[1]) or not out.is_contiguous():
        raise ValueError(f"nf4_dequant_group: out is {tuple(out.shape)}, needs contiguous {(rows, first.shape[1])}")
    block_bytes = _block_bytes(first.blocksize)
    args, start, tile = [], 0, 0
    for i in range(GROUP_SLOTS):
        w = weights[min(i, k - 1)]  # unused slots repeat the last member (never read)
        nested = w.code2 is not None
        member = [w.packed, w.absmax, w.code, w.code2 if nested else w.code, w.absmax2 if nested else w.code,
                  w.offset if nested else w.code, w.numel]
        args += member if i == 0 else member + [start, tile]
        if i < k:
            start += w.numel
            tile += triton.cdiv((w.numel + 1) // 2, block_bytes)
    _nf4_dequant_group_kernel[(tile,)](
        out, *args, MEMBERS=k, QBLOCK=first.blocksize, QBLOCK2=first.blocksize2, NESTED=first.code2 is not None,
        BLOCK_BYTES=block_bytes, num_warps=4, enable_fp_fusion=False,
    )
    return out
