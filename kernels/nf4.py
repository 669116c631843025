"""NF4 (4-bit NormalFloat, bitsandbytes layout) dequantization: Triton kernel or bitsandbytes.

A bitsandbytes ``Params4bit`` weight of logical shape (out, in) is stored as ``packed``
(ceil(out*in/2), 1) uint8 (two codes per byte, high nibble first) plus a ``QuantState``:
``absmax`` (one scale per ``blocksize`` elements; fp32, or uint8 with double quantization, then
``state2.absmax`` fp32 per 256 scales, ``state2.code`` (256,) and a scalar ``offset``), ``code``
(16,) the NF4 levels, ``shape`` and ``dtype``. Dequantized value of element i:

    W_flat[i] = code[nibble(i)] * absmax_f32[i // blocksize]                       (fp32, then cast)
    absmax_f32[b] = state2.code[absmax[b]] * state2.absmax[b // 256] + offset         (double quant)

:class:`NF4Weight` gathers those tensors once (no host sync), :func:`dequantize_nf4` dispatches,
:func:`dequantize_nf4_reference` is ``bitsandbytes.functional.dequantize_4bit`` (the CPU fallback
and the test oracle; the Triton kernel is bit-exact with it in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .dispatch import resolve_backend


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


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' own dequantization: (out, in) in ``dtype`` (default: the quant state's)."""
    import copy

    import bitsandbytes.functional as bnbF

    state = w.quant_state
    if dtype is not None and dtype != state.dtype:  # one rounding from fp32, as the kernel does
        state = copy.copy(state)
        state.dtype = dtype
    return bnbF.dequantize_4bit(w.packed.view(-1, 1), state)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """Dequantize ``w`` to a new (out, in) tensor in ``dtype`` (default: the quant state's dtype).

    ``backend``: ``auto|triton|torch`` (torch = bitsandbytes' kernel). The Triton kernel writes
    ``dtype`` directly (fp32 math, one rounding), so bf16 output costs no extra pass."""
    dtype = dtype or w.dtype
    if resolve_backend(backend, w.packed.device) == "triton":
        from ._triton_nf4 import nf4_dequant

        return nf4_dequant(w.packed, w.absmax, w.code, w.code2, w.absmax2, w.offset,
                           w.blocksize, w.blocksize2, w.shape, dtype)
    return dequantize_nf4_reference(w, dtype)
