"""Triton LoRA-dropout kernel and launcher (imported lazily by ``dropout.py``; needs triton).

    out = [acc +] where(keep_i, t_i * scale, 0)      keep_i = (philox(seed, i // 4)[i % 4] >> 1) >= thresh

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
from triton.runtime.jit import JITFunction

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _dropout_kernel(T, SEED, ACC_IN, OUT, n, thresh, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
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
        y += tl.load(ACC_IN + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


def _traceable(kernel):
    """``torch.library.wrap_triton(kernel)``, so torch.compile traces the launch; a kernel of the
    Triton interpreter (TRITON_INTERPRET=1: ``@triton.jit`` makes an ``InterpretedFunction``, not a
    ``JITFunction``) is launched as it is: torch < 2.13's ``wrap_triton`` rejects it, and an eager
    launch needs no wrapper (torch >= 2.13 returns it unwrapped too). Compiled kernels are unchanged."""
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


@torch.library.triton_op("qlora_trainer::lora_dropout", mutates_args=())
def _lora_dropout(t: torch.Tensor, seed: torch.Tensor, thresh: int, scale: float,
                  acc: torch.Tensor | None = None) -> torch.Tensor:
    """[acc +] t ⊙ k * scale as a new tensor like t: a ``torch.library.triton_op``, so torch.compile
    sees the kernel itself (no tracing of this Python; inductor may schedule and fuse around it)."""
    n = t.numel()
    out = torch.empty_like(t)
    grid = (triton.cdiv(n, _BLOCK),)
    _traceable(_dropout_kernel)[grid](t, seed, out if acc is None else acc, out, n, thresh, scale,
                                      ACC=acc is not None, BLOCK=_BLOCK, num_warps=_WARPS)
    return out


def dropout_launch(t: torch.Tensor, seed: torch.Tensor, thresh: int, scale: float,
                   acc: torch.Tensor | None = None) -> torch.Tensor:
    """t (contiguous, any shape, N < 2**31 elements; offsets int32), seed (1,) int64 on t's device;
    ``acc`` given (same shape, contiguous): ``acc + t ⊙ k * scale`` as a new tensor; else ``t ⊙ k * scale``."""
    return _lora_dropout(t, seed, thresh, scale, acc)
