"""Triton rotate-half RoPE kernel and launcher (imported lazily by ``rope.py``; needs triton).

One program per token (b, t): it loads that token's cos/sin row once and rotates every q head and
every k head of the token as (heads, D/2) register tiles, in fp32, writing new tensors. Bytes
moved: read q, k, cos, sin once; write q', k' once. The backward is the same kernel with the sine
halves swapped and negated (see ``rope.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_tile(X, Y, base, n_heads, half, c1, c2, s1, s2,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    off = base + h * (2 * half) + d
    x1 = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + off + half, mask=mask, other=0.0).to(tl.float32)
    # y = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]
    tl.store(Y + off, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + off + half, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, T, HQ, HK, half, stride_cb, stride_ct,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # token index b * T + t
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    cs = b * stride_cb + t * stride_ct + d
    c1 = tl.load(COS + cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: s1' = -s2, s2' = -s1
        s1, s2 = -s2, -s1
    _rotate_tile(Q, QO, pid * HQ * 2 * half, HQ, half, c1, c2, s1, s2, BLOCK_HQ, BLOCK_D)
    _rotate_tile(K, KO, pid * HK * 2 * half, HK, half, c1, c2, s1, s2, BLOCK_HK, BLOCK_D)


def rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, T, Hq, D), k: (B, T, Hk, D) contiguous; cos, sin: (B, T, D) with unit stride on D
    (batch stride may be 0). Returns rotated (or, with ``backward``, un-rotated) copies."""
    bsz, t, hq, dim = q.shape
    hk = k.shape[2]
    if dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {dim}")
    half = dim // 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if bsz * t == 0:
        return qo, ko
    block_d = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    warps = 4 if block_hq * block_d <= 2048 else 8
    _rope_kernel[(bsz * t,)](q, k, cos, sin, qo, ko, t, hq, hk, half, cos.stride(0), cos.stride(1),
                             BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                             BLOCK_D=block_d, num_warps=warps)
    return qo, ko
