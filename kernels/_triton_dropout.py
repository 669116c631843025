"""Triton LoRA-dropout kernel and launcher (imported lazily by ``dropout.py``; needs triton).

    out = [out +] where(keep_i, t_i * scale, 0)      keep_i = (philox(seed, i // 4)[i % 4] >> 1) >= thresh

Element-wise over the flattened (N,) tensor, BLOCK elements per program. ``seed`` is a (1,) int64
*device* tensor read inside the kernel (never a host integer, so a captured CUDA graph does not
freeze it); the element offset i is the flat index (int32: Triton's 32-bit Philox, 10 rounds, key =
the seed's low / high words, counter = (i // 4, 0, 0, 0), word i % 4: one Philox evaluation for four
elements, ``tl.randint4x``). ``dropout.py`` holds the torch reference,
bit-exact with this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _dropout_kernel(T, SEED, OUT, n, thresh, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32 element offsets i
    mask = offs < n
    seed = tl.load(SEED)
    ctr = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # int32: the 32-bit Philox counter
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)  # uint32 (BLOCK // 4,) each
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # element 4j + w: word w of j
    keep = (bits >> 1).to(tl.int32) >= thresh
    t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(keep, t * scale, 0.0)
    if ACC:
        y += tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


def dropout_launch(t: torch.Tensor, seed: torch.Tensor, thresh: int, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """t (contiguous, any shape, N < 2**31 elements; offsets int32), seed (1,) int64 on t's device; ``out`` given:
    accumulate into it (same shape, contiguous) and return it; else a new tensor like t."""
    n = t.numel()
    acc = out is not None
    if out is None:
        out = torch.empty_like(t)
    grid = (triton.cdiv(n, _BLOCK),)
    _dropout_kernel[grid](t, seed, out, n, thresh, scale, ACC=acc, BLOCK=_BLOCK, num_warps=_WARPS)
    return out
