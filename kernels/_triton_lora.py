"""Triton GEMM with NF4 dequantization fused into the operand load (imported lazily; needs triton).

    C (M, N) = A (M, K) @ op(W) (+ bias),   op(W) = W^T (TRANS_W, forward) or W (backward dx)

where W is the NF4 weight (out, in) in bitsandbytes' flat layout (see ``_triton_nf4.py``). Each
program owns a (BLOCK_M, BLOCK_N) tile of C; per K step it loads the activation tile and the
*packed* weight tile (0.5 byte/element plus 1 absmax byte per 64), dequantizes it in registers
(fp32 table lookup * block scale, rounded to the activation dtype exactly as a separate dequant
would), and feeds the tensor cores with ``tl.dot`` (fp32 accumulation). Meant for small token
counts (M <= ~64: decode, short sequences) where the GEMM is bound by reading W: it reads 4x fewer
weight bytes than a bf16 GEMM and skips the dequant kernel's 2-byte write + read entirely. For
large M the dequant kernel + cuBLAS wins (dequant cost amortised over M), see ``lora_linear.py``.
The weight tile is always loaded along W's contiguous axis (coalesced) and transposed in
registers when TRANS_W.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_nf4 import nf4_block_scale
from .backend import sm_count


@triton.jit
def _paired_w_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, pid_n, k0, N, K,
                   QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                   TRANS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W tile, (BLOCK_N, BLOCK_K) if TRANS_W else (BLOCK_K, BLOCK_N), for an even row length:
    (.., BLOCK/2) contiguous packed bytes -> high/low nibbles -> interleave along the row. Both
    elements of a byte share a quantization block (even element index, even blocksize)."""
    if TRANS_W:  # W (N, K): rows n, bytes along k
        rkh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (rn[:, None] < N) & (rkh[None, :] * 2 < K)
        byte = rn[:, None].to(tl.int64) * (K // 2) + rkh[None, :]
    else:  # W (K, N): rows k, bytes along n
        rk = k0 + tl.arange(0, BLOCK_K)
        rnh = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        mask = (rk[:, None] < K) & (rnh[None, :] * 2 < N)
        byte = rk[:, None].to(tl.int64) * (N // 2) + rnh[None, :]
    q = tl.load(PACKED + byte, mask=mask, other=0).to(tl.int32)
    scale = nf4_block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, (byte * 2) // QBLOCK, mask, NESTED, QBLOCK2)
    return tl.interleave(tl.load(CODE + (q >> 4)) * scale, tl.load(CODE + (q & 15)) * scale)


@triton.jit
def _nf4_matmul_kernel(A, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS, C,
                       M, N, K, stride_am, stride_cm, k_per_split,
                       QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                       TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST_DOT: tl.constexpr, PAIRED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # split-K slice [pid_k * k_per_split, +k_per_split), a BLOCK_K multiple
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rm[:, None] < M) & (rk[None, :] < K)
        a = tl.load(A + rm[:, None].to(tl.int64) * stride_am + rk[None, :], mask=a_mask, other=0.0)
        if PAIRED:  # W's row length is even: load each packed byte once, split, interleave
            w = _paired_w_tile(PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, rn, pid_n, k0, N, K,
                               QBLOCK, QBLOCK2, NESTED, TRANS_W, BLOCK_N, BLOCK_K)
        else:
            if TRANS_W:  # W is (N, K) row-major: tile (BLOCK_N, BLOCK_K), contiguous along k
                w_mask = (rn[:, None] < N) & (rk[None, :] < K)
                idx = rn[:, None].to(tl.int64) * K + rk[None, :]
            else:  # W is (K, N) row-major: tile (BLOCK_K, BLOCK_N), contiguous along n
                w_mask = (rk[:, None] < K) & (rn[None, :] < N)
                idx = rk[:, None].to(tl.int64) * N + rn[None, :]
            byte = tl.load(PACKED + idx // 2, mask=w_mask, other=0).to(tl.int32)
            nib = (byte >> (((idx & 1) ^ 1) * 4).to(tl.int32)) & 15  # even element: high nibble
            scale = nf4_block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, idx // QBLOCK, w_mask, NESTED, QBLOCK2)
            w = tl.load(CODE + nib) * scale  # masked k: a is 0 there
        w = w.to(A.dtype.element_ty)  # the same rounding as a separate dequant to A's dtype
        if TRANS_W:
            w = tl.trans(w)
        if UPCAST_DOT:  # the CPU interpreter mis-computes bf16 tl.dot; bf16 products are exact in fp32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptr = C + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=c_mask)


def _split_k(device: torch.device, programs: int, k_blocks: int) -> int:
    """K slices so that about two waves of programs cover the SMs (small-M GEMMs have few tiles)."""
    sms = sm_count(device)
    return max(1, min(2 * sms // max(programs, 1), k_blocks // 4 if k_blocks >= 8 else 1, 16))


def nf4_matmul(a: torch.Tensor, w, *, trans_w: bool, bias: torch.Tensor | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """a: (M, K) with unit stride on K; w: ``NF4Weight`` of shape (out, in).

    trans_w=True: K = in, returns a @ W^T (M, out) (+ bias (out,)). trans_w=False: K = out,
    returns a @ W (M, in). Output dtype = a.dtype; fp32 accumulation. ``split_k`` (default: by
    occupancy) > 1 writes fp32 partials (S, M, N) summed by torch: deterministic, no atomics."""
    out_f, in_f = w.shape
    m, k = a.shape
    n = out_f if trans_w else in_f
    if k != (in_f if trans_w else out_f):
        raise ValueError(f"nf4_matmul: a has {k} columns, weight is {tuple(w.shape)} (trans_w={trans_w})")
    # small M (decode / short sequences): narrow tiles, many programs over N; larger M: 128x128
    # tensor-core tiles (the bench measures where this beats dequant + cuBLAS).
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n, block_k, warps, stages = (64, 64, 4, 3) if m <= 64 else (128, 64, 8, 2)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    splits = split_k if split_k is not None else _split_k(a.device, programs, k_blocks)
    k_per_split = triton.cdiv(k_blocks, max(1, min(splits, k_blocks))) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    else:
        c = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    nested = w.code2 is not None
    dummy = w.code
    fuse_bias = bias is not None and splits == 1
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _nf4_matmul_kernel[grid](
        a, w.packed, w.absmax, w.code, w.code2 if nested else dummy, w.absmax2 if nested else dummy,
        w.offset if nested else dummy, bias if fuse_bias else dummy, c,
        m, n, k, a.stride(0), n, k_per_split,
        QBLOCK=w.blocksize, QBLOCK2=w.blocksize2, NESTED=nested, TRANS_W=trans_w,
        HAS_BIAS=fuse_bias, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        UPCAST_DOT=a.device.type != "cuda", PAIRED=in_f % 2 == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )
    if splits == 1:
        return c
    c = c.sum(0)
    if bias is not None:
        c += bias.float()
    return c.to(a.dtype)
