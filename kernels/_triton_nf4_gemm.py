"""Large-M Triton GEMMs that read the packed NF4 weight directly (imported lazily; needs triton).

    forward  C (M, N) = A (M, K) @ W^T (+ bias)    W (N, K) = (out, in): N = out, K = in
    dx       C (M, N) = A (M, K) @ W               W (K, N) = (out, in): K = out, N = in

W is bitsandbytes' flat NF4 layout (see ``_triton_nf4.py``): element ``i`` of the row-major (out, in)
weight is nibble ``i % 2`` (high first) of byte ``i // 2``, scaled by block ``i // QBLOCK``. Unlike
the decode-size ``_triton_lora.nf4_matmul`` (split-K, per-byte scale gathers), these kernels are
tiled for many tokens:

* the W tile never crosses a quantization block along W's contiguous axis (forward: BLOCK_K divides
  QBLOCK; dx: BLOCK_N divides QBLOCK), so when ``in % QBLOCK == 0`` (every real model; ``ALIGNED``)
  the tile needs **one scale per W row per k-step**: a (BLOCK_N,) or (BLOCK_K,) vector, with the
  double-quant absmax (``code2[u8] * absmax2[b // QBLOCK2] + offset``) decoded once per row, not
  per byte. Unaligned shapes (tests, odd models) gather one scale per packed byte instead;
* the 16 NF4 levels are loaded once per program into registers and looked up with ``tl.gather``
  (``LUT=0``) or read from the L1-resident table per nibble (``LUT=1``, the old kernel's way);
  the autotuner may pick either;
* offsets inside a tile are int32 (the tile's base pointer carries the 64-bit part);
* ``triton.autotune`` over a few tile configs keyed on (M bucket = next power of two capped at
  4096, N, K, block sizes), with grouped program order (``GROUP_M`` rows of tiles share W in L2).

Numerics equal "dequantize to A's dtype, then GEMM": each W element is ``code * scale`` in fp32,
rounded once to A's dtype, then ``tl.dot`` with fp32 accumulation (FMA contraction off, as in the
dequant kernel). Bytes read from HBM per GEMM: A once per N tile column group, W's 0.5 byte/element
+ scales once per M tile row (L2 absorbs the rest); no 16-bit W is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from .nf4 import gemm_supported

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, LUT, warps, stages): forward tiles have BLOCK_K <= 64 and
# dx tiles BLOCK_N <= 64, so every config keeps one scale per W row for QBLOCK >= 64.
_FWD = [(128, 128, 64, 8, 0, 8, 3), (128, 64, 64, 8, 0, 4, 4), (64, 128, 64, 8, 0, 4, 4), (128, 128, 64, 8, 1, 8, 3)]
_DX = [(128, 64, 128, 8, 0, 8, 3), (128, 64, 64, 8, 0, 4, 4), (256, 64, 64, 8, 0, 8, 3), (128, 64, 128, 8, 1, 8, 3)]
# fp32 A (ieee dots, no tensor cores): the tables above spill 6-10 KB of registers a thread (sm_90,
# cuobjdump's STACK); one 64x64 tile, 8 warps, spills nothing (STACK 0, 255 / 191 registers)
_FWD32 = [(64, 64, 32, 8, 0, 8, 2)]
_DX32 = [(64, 64, 32, 8, 0, 8, 2)]
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2, "LUT": 0}  # CPU interpreter
M_BUCKET_CAP = 4096


def _configs(table: list[tuple]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "LUT": lut},
                          num_warps=w, num_stages=s) for bm, bn, bk, g, lut, w, s in table]


def m_bucket(m: int) -> int:
    """The autotune key for M: the next power of two, capped (configs do not change beyond)."""
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_CAP)


@triton.jit
def _tile_origin(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(m0, n0), this program's first row and column of C, in grouped order: GROUP_M tile rows
    walk N together, so their W tiles hit L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return (first_m + (pid % width) % rows) * BLOCK_M, ((pid % width) // rows) * BLOCK_N


@triton.jit
def _scales(ABSMAX, CODE2, ABSMAX2, offset, blk, mask, NESTED: tl.constexpr, QBLOCK2: tl.constexpr):
    """fp32 scales of quantization blocks ``blk`` (any shape; double-quant aware, mul then add)."""
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(CODE2 + a8, mask=mask, other=0.0) * tl.load(ABSMAX2 + blk // QBLOCK2, mask=mask, other=0.0) + offset
    else:
        s = tl.load(ABSMAX + blk, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _levels(q, CODE, table, ROWS: tl.constexpr, LUT: tl.constexpr):
    """NF4 level of each 4-bit code ``q`` (ROWS, C) int32 -> fp32: a register gather from the
    16-entry ``table`` (LUT=0) or a load from the table in memory (LUT=1, L1-resident)."""
    if LUT == 0:  # one return per jitted function: an early return would compile both branches
        v = tl.gather(tl.broadcast_to(table[None, :], (ROWS, 16)), q, 1)
    else:
        v = tl.load(CODE + q)
    return v


@triton.jit
def _tile_scales(ABSMAX, CODE2, ABSMAX2, offset, row_blk, row_ok, elem, byte_ok, QBLOCK: tl.constexpr,
                 NESTED: tl.constexpr, QBLOCK2: tl.constexpr, ALIGNED: tl.constexpr):
    """The W tile's scales. ALIGNED: block ``row_blk`` (ROWS,) of each row (the tile lies in one
    block per row); else per packed byte from its first element's flat index ``elem`` (ROWS, C)."""
    if ALIGNED:
        s = _scales(ABSMAX, CODE2, ABSMAX2, offset, row_blk, row_ok, NESTED, QBLOCK2)
    else:
        s = _scales(ABSMAX, CODE2, ABSMAX2, offset, elem // QBLOCK, byte_ok, NESTED, QBLOCK2)
    return s


@triton.jit
def _decode(q, s, CODE, table, ROWS: tl.constexpr, ALIGNED: tl.constexpr, LUT: tl.constexpr):
    """Packed bytes q (ROWS, C) int32 -> fp32 (ROWS, 2C) in element order. ALIGNED: one scale per
    row, s (ROWS,); else one per byte, s (ROWS, C) (a byte never spans two blocks)."""
    hi = _levels(q >> 4, CODE, table, ROWS, LUT)
    lo = _levels(q & 15, CODE, table, ROWS, LUT)
    if ALIGNED:
        w = tl.interleave(hi, lo) * s[:, None]
    else:
        w = tl.interleave(hi * s, lo * s)
    return w


@triton.jit
def _dot(acc, a, w, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:  # the CPU interpreter mis-computes bf16 tl.dot; bf16 products are exact in fp32
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def _store(C, acc, BIAS, m0, n0, M, N, stride_cm, HAS_BIAS: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(BIAS + n0 + rn, mask=n0 + rn < N, other=0.0).to(tl.float32)[None, :]
    ptr = C + m0.to(tl.int64) * stride_cm + n0 + (rm[:, None] * stride_cm + rn[None, :])
    tl.store(ptr, acc.to(C.dtype.element_ty), mask=(m0 + rm[:, None] < M) & (n0 + rn[None, :] < N))


@triton.jit
def _nf4_gemm_fwd(A, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS, C, M, N, K, stride_am, stride_cm,
                  M_BUCKET, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                  ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST_DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, LUT: tl.constexpr):
    """C = A @ W^T: W tile (BLOCK_N rows of W, BLOCK_K/2 bytes each), decoded, transposed, dotted."""
    tl.static_assert(QBLOCK % BLOCK_K == 0)
    m0, n0 = _tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 2)
    m_ok = m0 + rm < M
    n_ok = n0 + rn < N
    half = K // 2  # bytes per W row (K even)
    a_base = A + m0.to(tl.int64) * stride_am
    w_base = PACKED + n0.to(tl.int64) * half
    table = tl.load(CODE + tl.arange(0, 16))
    offset = tl.load(OFFSET) if NESTED else 0.0
    row_blk = (n0 + rn) * (K // QBLOCK)  # first block of each W row (ALIGNED: K % QBLOCK == 0)
    a_ptr = a_base + (rm[:, None] * stride_am + rk[None, :])
    w_ptr = w_base + (rn[:, None] * half + rb[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr, mask=m_ok[:, None], other=0.0)
            q = tl.load(w_ptr, mask=n_ok[:, None], other=0).to(tl.int32)
            b_ok = n_ok[:, None]
        else:
            a = tl.load(a_ptr, mask=m_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
            b_ok = n_ok[:, None] & (k0 + 2 * rb < K)[None, :]
            q = tl.load(w_ptr, mask=b_ok, other=0).to(tl.int32)
        s = _tile_scales(ABSMAX, CODE2, ABSMAX2, offset, row_blk + k0 // QBLOCK, n_ok,
                         (n0 + rn)[:, None] * K + (k0 + 2 * rb)[None, :], b_ok, QBLOCK, NESTED, QBLOCK2, ALIGNED)
        w = _decode(q, s, CODE, table, BLOCK_N, ALIGNED, LUT).to(A.dtype.element_ty)
        acc = _dot(acc, a, tl.trans(w), PRECISION, UPCAST_DOT)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K // 2
    _store(C, acc, BIAS, m0, n0, M, N, stride_cm, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _nf4_gemm_dx(A, PACKED, ABSMAX, CODE, CODE2, ABSMAX2, OFFSET, BIAS, C, M, N, K, stride_am, stride_cm,
                 M_BUCKET, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, LUT: tl.constexpr):
    """C = A @ W: W tile (BLOCK_K rows of W, BLOCK_N/2 bytes each), decoded in place (no transpose).
    EVEN_N: no column mask on the W loads (constant along the row: vectorized byte loads)."""
    tl.static_assert(QBLOCK % BLOCK_N == 0)
    m0, n0 = _tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_N // 2)
    m_ok = m0 + rm < M
    if EVEN_N:
        col_ok = tl.full((1, BLOCK_N // 2), 1, tl.int1)
    else:
        col_ok = (n0 + 2 * rb < N)[None, :]
    half = N // 2  # bytes per W row (N = in, even)
    a_base = A + m0.to(tl.int64) * stride_am
    table = tl.load(CODE + tl.arange(0, 16))
    offset = tl.load(OFFSET) if NESTED else 0.0
    a_ptr = a_base + (rm[:, None] * stride_am + rk[None, :])
    w_ptr = PACKED + (rk[:, None] * half + (n0 // 2 + rb)[None, :])  # advanced by whole rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        if EVEN_K:
            a = tl.load(a_ptr, mask=m_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & col_ok
        q = tl.load(w_ptr, mask=b_ok, other=0).to(tl.int32)
        s = _tile_scales(ABSMAX, CODE2, ABSMAX2, offset, (k0 + rk) * (N // QBLOCK) + n0 // QBLOCK, k_ok,
                         (k0 + rk)[:, None] * N + (n0 + 2 * rb)[None, :], b_ok, QBLOCK, NESTED, QBLOCK2, ALIGNED)
        w = _decode(q, s, CODE, table, BLOCK_K, ALIGNED, LUT).to(A.dtype.element_ty)
        acc = _dot(acc, a, w, PRECISION, UPCAST_DOT)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K * half
    _store(C, acc, BIAS, m0, n0, M, N, stride_cm, HAS_BIAS, BLOCK_M, BLOCK_N)


def _quick_bench(kernel_call, quantiles):
    """The autotuner's timing: 5 ms warm-up, 20 ms of repeats per config (a training run tunes
    each (M bucket, N, K) once; triton's default 25 + 100 ms x 6 configs is a visible stall)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_EVEN_K = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
_EVEN_KN = {**_EVEN_K, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}
_KEY = ["M_BUCKET", "N", "K", "QBLOCK", "NESTED", "ALIGNED"]
_fwd_tuned = triton.autotune(_configs(_FWD), key=_KEY, do_bench=_quick_bench)(triton.heuristics(_EVEN_K)(_nf4_gemm_fwd))
_dx_tuned = triton.autotune(_configs(_DX), key=_KEY, do_bench=_quick_bench)(triton.heuristics(_EVEN_KN)(_nf4_gemm_dx))
_fwd_fp32 = triton.autotune(_configs(_FWD32), key=_KEY)(triton.heuristics(_EVEN_K)(_nf4_gemm_fwd))  # one config:
_dx_fp32 = triton.autotune(_configs(_DX32), key=_KEY)(triton.heuristics(_EVEN_KN)(_nf4_gemm_dx))  # nothing timed


def nf4_gemm(a: torch.Tensor, w, *, trans_w: bool, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """a: (M, K) with unit stride on K; w: ``NF4Weight`` (out, in) that :func:`~.nf4.gemm_supported` takes.

    trans_w=True: K = in, returns a @ W^T (M, out) (+ bias (out,)). trans_w=False: K = out, returns
    a @ W (M, in). Output dtype = a.dtype, fp32 accumulation. On CUDA the autotuner picks the tile
    config (16-bit A; fp32 A runs its one :data:`_FWD32` / :data:`_DX32` tile); elsewhere (the interpreter) ``config`` or :data:`INTERPRET_CONFIG` runs untuned."""
    out_f, in_f = w.shape
    m, k = a.shape
    n = out_f if trans_w else in_f
    if k != (in_f if trans_w else out_f):
        raise ValueError(f"nf4_gemm: a has {k} columns, weight is {tuple(w.shape)} (trans_w={trans_w})")
    if not gemm_supported(tuple(w.shape), w.blocksize):
        raise ValueError(f"nf4_gemm: weight {tuple(w.shape)} blocksize {w.blocksize} unsupported (in odd or blocksize < 64)")
    if a.stride(1) != 1:
        a = a.contiguous()
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    nested = w.code2 is not None
    dummy = w.code
    args = (a, w.packed, w.absmax, w.code, w.code2 if nested else dummy, w.absmax2 if nested else dummy,
            w.offset if nested else dummy, bias if bias is not None else dummy, c, m, n, k, a.stride(0), n,
            m_bucket(m))
    meta = dict(QBLOCK=w.blocksize, QBLOCK2=w.blocksize2, NESTED=nested, ALIGNED=in_f % w.blocksize == 0,
                HAS_BIAS=bias is not None, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                UPCAST_DOT=a.device.type != "cuda")
    if a.device.type == "cuda" and config is None:
        if a.dtype == torch.float32:
            kernel = _fwd_fp32 if trans_w else _dx_fp32
        else:
            kernel = _fwd_tuned if trans_w else _dx_tuned
        grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **meta, enable_fp_fusion=False)
        return c
    cfg = dict(INTERPRET_CONFIG if config is None else config)
    warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
    kernel = _nf4_gemm_fwd if trans_w else _nf4_gemm_dx
    even = {"EVEN_K": k % cfg["BLOCK_K"] == 0} | ({} if trans_w else {"EVEN_N": n % cfg["BLOCK_N"] == 0})
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    kernel[grid](*args, **meta, **even, **cfg, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return c
