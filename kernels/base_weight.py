"""The frozen base weight of a linear layer as one object: the only place that turns a frozen
``nn.Linear`` / bitsandbytes NF4 ``Linear4bit`` into W.

:class:`BaseWeight` owns dequantization (:meth:`~BaseWeight.weight`), the forward matmul
``x @ W^T + b``, the backward dx matmul ``dy @ W`` and the merge ``W + s B A``; LoRA, DoRA, merge
and the autograd Functions all ask it. :func:`base_weight` builds it once per module and caches it
on the module (rebuilt only when the weight, its quant state, device, dtype or the backend change),
so a step does not rebuild it per call.

``COUNTS`` counts dequantizations and base matmuls (any backend), for the step-count tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .nf4 import NF4Weight, dequantize_nf4

# Above this many tokens the dequant pass is amortised and cuBLAS on a dequantized W is faster
# than the fused dequant-in-GEMM kernel (to be re-tuned with benchmarks/kernels/bench_nf4_lora.py).
FUSED_MAX_TOKENS = 64

COUNTS: Counter = Counter()  # "dequant", "forward", "dx": calls since import (tests reset it)
_CACHE_ATTR = "_qlora_base_weight"


def count(key: str) -> None:
    """``COUNTS[key] += 1`` in eager mode; nothing while torch.compile traces (a compiled graph runs no
    Python to count, and dynamo refuses a global side effect inside an autograd.Function)."""
    if not torch.compiler.is_compiling():
        COUNTS[key] += 1


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality
class BaseWeight:
    """The frozen base layer of a LoRA linear: exactly one of ``dense`` (out, in) or ``nf4``; bias
    (out,) or None. ``backend`` (``triton|torch``) picks the NF4 dequant/fused kernels."""

    dense: torch.Tensor | None = None
    nf4: NF4Weight | None = None
    bias: torch.Tensor | None = None
    backend: str = "triton"

    @classmethod
    def from_module(cls, base: nn.Module, backend: str = "triton") -> "BaseWeight | None":
        """From a frozen ``nn.Linear`` or bitsandbytes ``Linear4bit`` (NF4); None if unsupported
        (trainable base, FP4, not yet quantized, other module types) — callers then fall back.
        Uncached: use :func:`base_weight`."""
        weight = getattr(base, "weight", None)
        bias = getattr(base, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.requires_grad:
            return None
        if bias is not None and bias.requires_grad:
            return None
        state = quant_state_of(base)
        if state is not None:
            if state.quant_type != "nf4":
                return None
            if getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError("this NF4 weight was repacked by bitsandbytes' AVX512 CPU inference path "
                                   "(lossy, no autograd); claim the model's 4-bit layers before running it: "
                                   "qlora_trainer.models.nf4_linear.claim_4bit_layers(model)")
            return cls(nf4=NF4Weight.from_bnb(weight.data, state), bias=bias, backend=backend)
        if type(base) is nn.Linear:
            return cls(dense=weight, bias=bias, backend=backend)
        return None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.nf4.shape if self.nf4 is not None else self.dense.shape)  # type: ignore[return-value]

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in ``dtype`` (default: the stored / quant-state dtype); a transient
        dequantized copy for NF4, the weight itself (not a copy) for a dense one of that dtype."""
        if self.nf4 is not None:
            count("dequant")
            return dequantize_nf4(self.nf4, dtype, backend=self.backend)
        return self.dense if dtype is None else self.dense.to(dtype)

    def weight_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write W into ``out`` (contiguous (out, in), its dtype), e.g. a group's rows; returns it."""
        if self.nf4 is not None:
            count("dequant")
            return dequantize_nf4(self.nf4, backend=self.backend, out=out)
        return out.copy_(self.dense)

    def merged(self, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> torch.Tensor:
        """W + scale * B @ A (out, in) in fp32: B (out, r), A (r, in)."""
        return torch.addmm(self.weight().float(), lora_B.detach().float(), lora_A.detach().float(), alpha=scale)

    def _fused(self, m: int, fuse: bool | None) -> bool:
        if self.nf4 is None or self.backend != "triton":
            return False
        return m <= FUSED_MAX_TOKENS if fuse is None else fuse

    def forward_matmul(self, x: torch.Tensor, fuse: bool | None = None) -> torch.Tensor:
        """x (M, in) -> x @ W^T + bias (M, out), in x.dtype."""
        count("forward")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._fused(x.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(x, self.nf4, trans_w=True, bias=bias)
        w = self.weight(x.dtype)
        return torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()

    def backward_matmul(self, dy: torch.Tensor, fuse: bool | None = None) -> torch.Tensor:
        """dy (M, out) -> dy @ W (M, in), in dy.dtype (W recomputed, never saved)."""
        count("dx")
        if self._fused(dy.shape[0], fuse):
            from ._triton_lora import nf4_matmul

            return nf4_matmul(dy, self.nf4, trans_w=False)
        return dy @ self.weight(dy.dtype)


def quant_state_of(base: nn.Module) -> Any:
    """The bitsandbytes ``QuantState`` of ``base``'s 4-bit weight, or None (not 4-bit): the weight's
    own, else the one the layer keeps (``Linear4bit.quant_state``) when the weight is packed storage
    (out*in/2/elsize, 1) that lost it. That happens under FSDP2, which all-gathers the packed bytes
    into a plain Parameter each forward (bitsandbytes looks in the same place,
    ``fix_4bit_weight_quant_state_from_module``; read here, nothing is mutated). Reading it here,
    not only in the layer's own forward pre-hook, matters for grouped projections, which never call
    the members' forward: the forward and the checkpoint's recompute must take the same path."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == 1:
        kept = getattr(base, "quant_state", None)
        state = kept if type(kept).__name__ == "QuantState" else None
    return state


def _cache_key(base: nn.Module, backend: str) -> tuple:
    w, b = getattr(base, "weight", None), getattr(base, "bias", None)
    if not isinstance(w, torch.Tensor):
        return (backend, None)
    wk = (id(w), w.data_ptr(), w.device, w.dtype, w.requires_grad, w._version,
          id(quant_state_of(base)), type(base))
    bk = None if b is None else (id(b), b.data_ptr(), b.dtype, b.requires_grad)
    return (backend, wk, bk)


def base_weight(base: nn.Module, backend: str = "triton") -> BaseWeight | None:
    """:meth:`BaseWeight.from_module` (``backend`` already resolved: ``triton|torch``), built once
    and cached on ``base``; rebuilt when its weight/bias object, storage, device, dtype, version,
    quant state or trainability change. None for a base the kernels do not read.

    While torch.compile traces, the cached object is returned unchecked (the key reads storage
    pointers and versions, which dynamo cannot trace; the frozen base does not change within a
    run); without one, it is built in eager mode (a graph break)."""
    if torch.compiler.is_compiling():
        hit = base.__dict__.get(_CACHE_ATTR)
        return hit[1] if hit is not None and hit[0][0] == backend else _base_weight_eager(base, backend)
    return _base_weight_eager(base, backend)


@torch.compiler.disable
def _base_weight_eager(base: nn.Module, backend: str) -> BaseWeight | None:
    key = _cache_key(base, backend)
    hit = base.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        return hit[1]
    bw = BaseWeight.from_module(base, backend=backend)
    base.__dict__[_CACHE_ATTR] = (key, bw)
    return bw
