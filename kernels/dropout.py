"""LoRA dropout from a *device* seed: a counter-based keep-mask that nothing host-side freezes.

The forward draws ``seed = draw_seed(device)``: a (1,) int64 tensor from torch's default generator
*of that device* (the CUDA Philox generator on a GPU, the CPU one on the CPU). The keep-mask of an
(N,)-element tensor (flattened, element offset i) is a pure function of (seed, i, p)::

    bits_i = Philox4x32-10(key = (seed mod 2^32, seed >> 32 mod 2^32), counter = (i, 0, 0, 0))[0]
    k_i    = 1 if (bits_i >> 1) >= ceil(p * 2^31) else 0          P(k_i = 1) = 1 - p (to 2^-31)

(the first output word of Triton's ``tl.randint``; the 31-bit comparison is exact in int32). So:

* the backward regenerates the forward's mask from the saved seed tensor (8 bytes saved, not the
  (N,) mask); no element of the mask ever needs the host;
* a captured CUDA graph (``torch.cuda.graphs`` / ``torch.compile(mode="reduce-overhead")``) replays
  the ``randint`` kernel, and torch's CUDA generator is graph-safe (each replay advances its Philox
  offset), so every replay draws a new seed: no host integer is baked into the graph;
* ``torch.utils.checkpoint`` (``preserve_rng_state``) restores the device generator before the
  recompute, which draws the same seed again; exact resume saves and restores the CPU and CUDA
  generator states (``train/checkpoint.py: rng_state``), which covers this draw.

The Triton kernel (``_triton_dropout.py``) and the torch reference here compute the same bits
(the reference is Philox in int64 tensor ops: 32x32-bit products split into 16-bit halves so that
nothing overflows), and the same rounding: ``t * scale`` (scale = fp32(1 / (1 - p))) rounded once
to t's dtype, plus ``out`` before that rounding when accumulating. Which one runs: the resolved
backend (``backend.resolve_backend``).
"""

from __future__ import annotations

import math

import torch

from .backend import resolve_backend

__all__ = ["draw_seed", "keep_threshold", "philox_bits", "dropout_mask", "dropout_apply"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85      # Weyl key increments
_ROUNDS = 10
_MAX_NUMEL = 2**31                           # the element offset is Triton's int32 counter


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed: (1,) int64 in [0, 2^63 - 1) drawn on ``device`` by its default generator."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)


def keep_threshold(p: float) -> int:
    """ceil(p * 2^31): an element is kept when its 31 random bits are >= this (p in [0, 1))."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return math.ceil(p * 2**31)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant a and b in [0, 2^32) (int64 tensors)."""
    p_hi, p_lo = a * (b >> 16), a * (b & 0xFFFF)  # each < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32


def philox_bits(seed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first Philox4x32-10 word for counters 0..numel-1: (numel,) int64 in [0, 2^32), equal to
    Triton's ``tl.randint(seed, offsets)`` (torch reference; ``seed`` (1,) int64)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = torch.arange(numel, dtype=torch.int64, device=seed.device)
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def dropout_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask k (``shape``, 1 with probability 1 - p, else 0) in ``dtype`` on seed's device
    (torch reference; the test oracle and the explicit-mask form of :func:`dropout_apply`)."""
    numel = math.prod(shape)
    return ((philox_bits(seed, numel) >> 1) >= keep_threshold(p)).view(shape).to(dtype)


def dropout_apply(t: torch.Tensor, seed: torch.Tensor, p: float, backend: str = "auto",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """t ⊙ k / (1 - p) for the mask k of (seed, t's flat index, p): a new tensor like t, or, with
    ``out`` (t's shape and dtype), ``out + t ⊙ k / (1 - p)`` written into ``out`` (one rounding).
    t: any shape, contiguous; p in (0, 1); backend ``auto|triton|torch``."""
    if t.numel() >= _MAX_NUMEL:
        raise ValueError(f"dropout over {t.numel()} elements: at most 2**31 - 1 per call")
    scale = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))  # the kernel's fp32 scale
    if resolve_backend(backend, t.device) == "triton":
        from ._triton_dropout import dropout_launch

        return dropout_launch(t, seed, keep_threshold(p), scale, out)
    keep = (philox_bits(seed, t.numel()) >> 1).view(t.shape) >= keep_threshold(p)
    if out is not None:
        return out.addcmul_(t, keep.to(t.dtype), value=scale)
    return torch.where(keep, t * scale, 0.0)
