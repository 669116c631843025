"""LoRA dropout from a *device* seed: a counter-based keep-mask that nothing host-side freezes.

The forward draws ``seed = draw_seed(device)``: a (1,) int64 tensor from torch's default generator
*of that device* (the CUDA Philox generator on a GPU, the CPU one on the CPU). The keep-mask of an
(N,)-element tensor (flattened, element offset i) is a pure function of (seed, i, p)::

    bits_i = Philox4x32-10(key = (seed mod 2^32, seed >> 32 mod 2^32), counter = (i // 4, 0, 0, 0))[i % 4]
    k_i    = 1 if (bits_i >> 1) >= ceil(p * 2^31) else 0          P(k_i = 1) = 1 - p (to 2^-31)

(the four output words of Triton's ``tl.randint4x`` per counter, so one Philox evaluation serves
four elements; the 31-bit comparison is exact in int32). So:

* the backward regenerates the forward's mask from the saved seed tensor (8 bytes saved, not the
  (N,) mask); no element of the mask ever needs the host;
* a captured CUDA graph (``torch.cuda.graphs`` / ``torch.compile(mode="reduce-overhead")``) replays
  the ``randint`` kernel, and torch's CUDA generator is graph-safe (each replay advances its Philox
  offset), so every replay draws a new seed: no host integer is baked into the graph;
* ``torch.utils.checkpoint`` (``preserve_rng_state``) restores the device generator before the
  recompute, which draws the same seed again; exact resume saves and restores the CPU and CUDA
  generator states (``train/checkpoint.py: rng_state``), which covers this draw.

The Triton kernel (``_triton_dropout.py``) and the torch reference here compute the same bits
(the reference is Philox in int64 tensor ops, :func:`philox_bits`), and the same rounding:
``t * scale`` (scale = fp32(1 / (1 - p))) rounded once to t's dtype, plus ``out`` before that
rounding when accumulating. Which one runs: the resolved backend (``backend.resolve_backend``).
"""

from __future__ import annotations

import math
import struct

import torch

from .backend import resolve_backend

__all__ = ["draw_seed", "keep_threshold", "philox_bits", "dropout_mask", "dropout_apply", "SeededDropout"]

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


def philox_bits(seed: torch.Tensor, numel: int) -> torch.Tensor:
    """bits_i (module docstring) for i in 0..numel-1: (numel,) int64 in [0, 2^32), equal to the
    words of Triton's ``tl.randint4x(seed, i // 4)`` (torch reference; ``seed`` (1,) int64).

    Per round, with (hi, lo) the 32-bit words of a 32x32-bit product (exact in 64 bits; int64
    multiplication wraps, and >> then & M32 reads the high word as unsigned)::

        c0, c1, c2, c3 = hi(B c2) ^ c1 ^ k0,  lo(B c2),  hi(A c0) ^ c3 ^ k1,  lo(A c0)
        k0, k1 = k0 + KEY_A, k1 + KEY_B   (mod 2^32)
    Round 1 has c1 = c2 = c3 = 0 (so hi(B c2) = lo(B c2) = 0)."""
    rounds = torch.arange(_ROUNDS, dtype=torch.int64, device=seed.device)
    k0 = ((seed & _M32) + rounds * _KEY_A) & _M32  # (10,) the key of each round
    k1 = (((seed >> 32) & _M32) + rounds * _KEY_B) & _M32
    n4 = -(-numel // 4)
    pa = torch.arange(n4, dtype=torch.int64, device=seed.device) * _ROUND_A
    c0, c1, c2, c3 = k0[:1].expand(n4), None, ((pa >> 32) & _M32) ^ k1[0], pa & _M32
    for r in range(1, _ROUNDS):
        pb, pa = c2 * _ROUND_B, c0 * _ROUND_A
        hb = (pb >> 32).bitwise_and_(_M32).bitwise_xor_(k0[r])
        c0 = hb if c1 is None else hb.bitwise_xor_(c1)
        c2 = (pa >> 32).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1[r])
        c1, c3 = pb.bitwise_and_(_M32), pa.bitwise_and_(_M32)
    return torch.stack((c0, c1, c2, c3), 1).view(-1)[:numel]


def _keep(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """k as a (numel,) bool tensor (torch reference)."""
    return (philox_bits(seed, numel) >> 1) >= keep_threshold(p)


def dropout_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask k (``shape``, 1 with probability 1 - p, else 0) in ``dtype`` on seed's device
    (torch reference; the test oracle and the explicit-mask form of :class:`SeededDropout`)."""
    return _keep(seed, math.prod(shape), p).view(shape).to(dtype)


class SeededDropout:
    """t -> t ⊙ k / (1 - p) for the mask k of (seed, t's flat index, p), for any number of tensors
    of one size (the torch reference computes k once and keeps it for this object's lifetime: a
    backward's two uses). ``backend`` ``auto|triton|torch`` (resolved by ``backend.resolve_backend``)."""

    def __init__(self, seed: torch.Tensor, p: float, backend: str = "auto") -> None:
        self.seed, self.p = seed, p
        self.thresh = keep_threshold(p)
        self.scale = struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]  # the kernel's fp32 scale
        self.backend = resolve_backend(backend, seed.device, "dropout")
        self._keep: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A new tensor like t (any shape, contiguous), or, with ``out`` (t's shape and dtype),
        ``out + t ⊙ k / (1 - p)`` (one rounding): written into ``out`` by the reference, a new tensor
        from the Triton op (out-of-place: a ``torch.library.triton_op`` torch.compile can see through).
        Callers use the returned tensor."""
        if t.numel() >= _MAX_NUMEL:
            raise ValueError(f"dropout over {t.numel()} elements: at most 2**31 - 1 per call")
        if self.backend == "triton":
            from ._triton_dropout import dropout_launch

            return dropout_launch(t, self.seed, self.thresh, self.scale, out)
        if self._keep is None or self._keep.numel() != t.numel():
            self._keep = _keep(self.seed, t.numel(), self.p)
        keep = self._keep.view(t.shape)
        if out is not None:
            return out.addcmul_(t, keep.to(t.dtype), value=self.scale)
        return (t * keep).mul_(self.scale)  # t * k exact, one rounding


def dropout_apply(t: torch.Tensor, seed: torch.Tensor, p: float, backend: str = "auto",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One :class:`SeededDropout` call: t ⊙ k / (1 - p) (or ``out`` + that, in place); p in (0, 1)."""
    return SeededDropout(seed, p, backend)(t, out)
