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
def _nf4_dequant_kernel(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, OUT, numel, n_bytes, n_blocks, blk0,
                        QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                        BLOCK_BYTES: tl.constexpr):
    # The tile is (ROWS, HALF): one row per quantization block (HALF = QBLOCK / 2 packed bytes),
    # so the block scale is loaded once per row and broadcast, and the byte loads are contiguous
    # with a mask that is constant over 16-byte groups (vectorized when n_bytes % 16 == 0).
    HALF: tl.constexpr = QBLOCK // 2
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    # (ROWS,) block indices, from block blk0 on (a row range; OUT holds elements from blk0 * QBLOCK)
    blk = blk0 + tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    q = tl.load(PACKED + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    scale = nf4_block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, blk < n_blocks, NESTED, QBLOCK2)
    hi = tl.load(CODE + (q >> 4)) * scale[:, None]  # element 2*byte
    lo = tl.load(CODE + (q & 15)) * scale[:, None]  # element 2*byte + 1 (same block: QBLOCK even)
    vals = tl.interleave(hi, lo)  # (ROWS, QBLOCK) fp32, row-major = flat element order
    idx = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(OUT + (idx - blk0 * QBLOCK), vals.to(OUT.dtype.element_ty), mask=idx < numel)


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
    block_bytes = max(1024, blocksize // 2)  # a whole number of quantization blocks per program
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
