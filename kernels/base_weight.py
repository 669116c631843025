"""The frozen base weight of a linear layer as one object: the only place that turns a frozen
``nn.Linear`` / bitsandbytes NF4 ``Linear4bit`` into W.

:class:`BaseWeight` owns dequantization (:meth:`~BaseWeight.weight`), the forward matmul
``x @ W^T + b``, the backward dx matmul ``dy @ W`` and the merge ``W + s B A``; LoRA, DoRA, merge
and the autograd Functions all ask it. :func:`base_weight` builds it once per module and caches it
on the module (rebuilt only when the weight, its quant state, device, dtype or the backend change),
so a step does not rebuild it per call.

``COUNTS`` counts dequantizations and base matmuls (any backend), for the step-count tests.

Which NF4 matmul runs for M tokens is decided here only (:meth:`BaseWeight.path`): ``decode``
(M <= ``DECODE_MAX_TOKENS``: the split-K dequant-in-GEMM, ``_triton_lora.py``), else the weight's
large-M path (``performance.nf4_matmul``, set per model by :func:`set_nf4_matmul`): ``dequant`` (the
default: the dequant kernel writes a transient 16-bit W, cuBLAS reads it), ``chunked`` (W
dequantized in L2-sized row chunks, each chunk's GEMM run at once) or ``fused`` (the tiled
autotuned GEMM reading packed NF4, ``_triton_nf4_gemm.py``). Dense weights and the torch backend
always take ``dequant`` (a plain matmul).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backend import on_reference
from .nf4 import NF4Weight, dequantize_nf4, gemm_supported, row_step_for

# At or below this many tokens the split-K decode kernel (_triton_lora.nf4_matmul) runs; above it
# the weight's large-M path (to be re-tuned with benchmarks/kernels/bench_nf4_lora.py).
DECODE_MAX_TOKENS = 64

NF4_MATMUL_PATHS = ("dequant", "chunked", "fused")  # the large-M paths (config: performance.nf4_matmul)
# 16-bit W bytes per chunk of the chunked path: a chunk, its GEMM's share of x and y stay in L2
# (50 MB on an H100/H200); to be tuned with benchmarks/kernels/bench_nf4_lora.py
CHUNK_BYTES = 8 << 20

COUNTS: Counter = Counter()  # "dequant", "forward", "dx": calls since import (tests reset it)
_CACHE_ATTR = "_qlora_base_weight"
_PATH_ATTR = "_qlora_nf4_matmul"  # (path, chunk_bytes) on an NF4 module, set by set_nf4_matmul


def count(key: str) -> None:
    """``COUNTS[key] += 1`` in eager mode; nothing while torch.compile traces (a compiled graph runs no
    Python to count, and dynamo refuses a global side effect inside an autograd.Function)."""
    if not torch.compiler.is_compiling():
        COUNTS[key] += 1


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality
class BaseWeight:
    """The frozen base layer of a LoRA linear: exactly one of ``dense`` (out, in) or ``nf4``; bias
    (out,) or None. ``backend`` (``triton|torch``) picks the NF4 dequant/fused kernels.
    ``large_m``: the NF4 path above ``DECODE_MAX_TOKENS`` (one of :data:`NF4_MATMUL_PATHS`);
    ``chunk_bytes``: 16-bit W bytes per chunk of the ``chunked`` path."""

    dense: torch.Tensor | None = None
    nf4: NF4Weight | None = None
    bias: torch.Tensor | None = None
    backend: str = "triton"
    large_m: str = "dequant"
    chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.large_m not in NF4_MATMUL_PATHS:
            raise ValueError(f"BaseWeight.large_m: {self.large_m!r} is not one of {', '.join(NF4_MATMUL_PATHS)}")

    @classmethod
    def from_module(cls, base: nn.Module, backend: str = "triton", large_m: str = "dequant",
                    chunk_bytes: int = CHUNK_BYTES) -> "BaseWeight | None":
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
            return cls(nf4=NF4Weight.from_bnb(weight.data, state), bias=bias, backend=backend,
                       large_m=large_m, chunk_bytes=chunk_bytes)
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

    def path(self, m: int, decode: bool | None = None) -> str:
        """The matmul that runs over ``m`` tokens: ``decode`` | ``fused`` | ``chunked`` | ``dequant``
        (see the module docstring). ``decode`` True/False forces/forbids the decode kernel."""
        if self.nf4 is None or self.backend != "triton":
            return "dequant"
        use_decode = not on_reference("nf4_decode")  # a kernel that failed its self-check never runs
        if decode is not None:
            return "decode" if decode and use_decode else "dequant"
        if m <= DECODE_MAX_TOKENS:
            return "decode" if use_decode else "dequant"
        if self.large_m == "fused" and (not gemm_supported(self.nf4.shape, self.nf4.blocksize)
                                        or on_reference("nf4_gemm")):
            return "dequant"
        return self.large_m

    def forward_matmul(self, x: torch.Tensor, decode: bool | None = None) -> torch.Tensor:
        """x (M, in) -> x @ W^T + bias (M, out), in x.dtype."""
        count("forward")
        return self._matmul(x, None if self.bias is None else self.bias.to(x.dtype), decode, trans_w=True)

    def backward_matmul(self, dy: torch.Tensor, decode: bool | None = None) -> torch.Tensor:
        """dy (M, out) -> dy @ W (M, in), in dy.dtype (W recomputed, never saved)."""
        count("dx")
        return self._matmul(dy, None, decode, trans_w=False)

    def _matmul(self, a: torch.Tensor, bias: torch.Tensor | None, decode: bool | None, *,
                trans_w: bool) -> torch.Tensor:
        """trans_w: a @ W^T (+ bias); else a @ W; through :meth:`path`'s kernel for a's M rows."""
        path = self.path(a.shape[0], decode)
        if path == "decode":
            from ._triton_lora import nf4_matmul

            return nf4_matmul(a, self.nf4, trans_w=trans_w, bias=bias)
        if path == "fused":
            from ._triton_nf4_gemm import nf4_gemm

            return nf4_gemm(a, self.nf4, trans_w=trans_w, bias=bias)
        if path == "chunked":
            return self._chunked(a, bias, trans_w=trans_w)
        w = self.weight(a.dtype)
        if not trans_w:
            return a @ w
        return torch.addmm(bias, a, w.t()) if bias is not None else a @ w.t()

    def chunk_rows(self, elem_bytes: int) -> int:
        """W rows per chunk of the chunked path (:func:`chunk_rows`)."""
        return chunk_rows(*self.shape, self.nf4.blocksize, elem_bytes, self.chunk_bytes)

    def _chunked(self, a: torch.Tensor, bias: torch.Tensor | None, *, trans_w: bool) -> torch.Tensor:
        """Row chunks W[r0:r1] (rows, in), dequantized one at a time into one reused buffer, each
        GEMM run right after its dequant (the chunk is still in L2):
        trans_w: a = x (M, in) -> y[:, r0:r1] = x @ W[r0:r1]^T (+ bias[r0:r1]), y (M, out);
        else:    a = dy (M, out) -> dx = sum over chunks of dy[:, r0:r1] @ W[r0:r1], dx (M, in)."""
        out_f, in_f = self.shape
        rows = self.chunk_rows(a.element_size())
        buf = torch.empty(rows, in_f, dtype=a.dtype, device=a.device)
        res = torch.empty(a.shape[0], out_f if trans_w else in_f, dtype=a.dtype, device=a.device)
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            count("dequant")
            w = dequantize_nf4(self.nf4, backend=self.backend, out=buf[: r1 - r0], rows=(r0, r1))
            if trans_w and bias is not None:
                torch.addmm(bias[r0:r1], a, w.t(), out=res[:, r0:r1])
            elif trans_w:
                torch.mm(a, w.t(), out=res[:, r0:r1])
            elif r0 == 0:
                torch.mm(a[:, r0:r1], w, out=res)
            else:
                res.addmm_(a[:, r0:r1], w)
        return res


def chunk_rows(out_f: int, in_f: int, blocksize: int, elem_bytes: int, chunk_bytes: int) -> int:
    """W (out_f, in_f) rows per chunk: about ``chunk_bytes`` of ``elem_bytes``-wide W, a multiple
    of :func:`~.nf4.row_step_for` (each chunk a whole-block range of the NF4 storage), at most out_f."""
    step = row_step_for(in_f, blocksize)
    return min(out_f, max(step, chunk_bytes // (in_f * elem_bytes) // step * step))


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
          id(quant_state_of(base)), type(base), base.__dict__.get(_PATH_ATTR))
    bk = None if b is None else (id(b), b.data_ptr(), b.dtype, b.requires_grad)
    return (backend, wk, bk)


def base_weight(base: nn.Module, backend: str = "triton") -> BaseWeight | None:
    """:meth:`BaseWeight.from_module` (``backend`` already resolved: ``triton|torch``), built once
    and cached on ``base``; rebuilt when its weight/bias object, storage, device, dtype, version,
    quant state, trainability or large-M path (:func:`set_nf4_matmul`) change. None for a base the
    kernels do not read.

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
    large_m, chunk_bytes = base.__dict__.get(_PATH_ATTR) or ("dequant", CHUNK_BYTES)
    bw = BaseWeight.from_module(base, backend=backend, large_m=large_m, chunk_bytes=chunk_bytes)
    base.__dict__[_CACHE_ATTR] = (key, bw)
    return bw


def set_nf4_matmul(model: nn.Module, path: str = "dequant", chunk_bytes: int = CHUNK_BYTES) -> int:
    """Make every NF4 weight under ``model`` run ``path`` (:data:`NF4_MATMUL_PATHS`) above
    ``DECODE_MAX_TOKENS`` (``performance.nf4_matmul``); cached base weights rebuild. Returns how many."""
    if path not in NF4_MATMUL_PATHS:
        raise ValueError(f"nf4_matmul: {path!r} is not one of {', '.join(NF4_MATMUL_PATHS)}")
    n = 0
    for mod in model.modules():
        if quant_state_of(mod) is not None:
            mod.__dict__[_PATH_ATTR] = (path, chunk_bytes)
            n += 1
    return n
