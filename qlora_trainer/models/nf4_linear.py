"""bitsandbytes 4-bit layers whose compute is ours: :class:`NF4Linear` and :func:`claim_4bit_layers`.

bitsandbytes owns the NF4 format, the quantization and the storage (``Params4bit`` / ``QuantState``).
Its *compute* on the CPU depends on the CPU's features, and two of those branches change our
numbers (docs/bitsandbytes-cpu.md):

* AVX512-BF16: ``Linear4bit.forward`` in eval mode with an input that needs no grad repacks the
  weight in place (``_convert_weight_packed_for_cpu``) into a layout with bf16-rounded scales,
  never reverts it, crashes on shapes it cannot pack, and its matmul has no autograd: input
  gradients are silently dropped afterwards. The switch is the per-instance attribute
  ``support_avx512bf16_for_cpu``: :func:`claim_4bit_layers` turns it off on every 4-bit layer.
* AVX512F: its native CPU NF4 dequantize mis-indexes block scales when ``in_features`` is not a
  multiple of the block size. :class:`NF4Linear` never calls it.

:class:`NF4Linear` is ``Linear4bit`` with one method replaced: ``forward`` computes
``x @ deq(W)^T + b`` through ``qlora_trainer.kernels`` (the torch reference on the CPU, Triton on
CUDA, chosen in ``kernels/dispatch.py``), with a backward that re-dequantizes W instead of saving
it. Storage, ``state_dict`` keys, ``isinstance(m, bnb.nn.Linear4bit)`` (PEFT, transformers) and
device moves are bitsandbytes' own. Layers are claimed by changing the instance's class to this
subclass, the way ``torch.nn.utils.parametrize`` specialises a module, so no tensor is copied.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_trainer.kernels.dispatch import frozen_matmul

log = logging.getLogger(__name__)


class NF4Linear(bnb.nn.Linear4bit):
    """A frozen bitsandbytes NF4 ``Linear4bit`` computed by our kernels. x (..., in) -> (..., out)."""

    kernel_backend: str = "auto"  # ``auto|triton|torch``, resolved per call by the kernels' dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self)
        dtype = self.compute_dtype or x.dtype
        y = frozen_matmul(x.to(dtype), self, backend=self.kernel_backend)
        if y is None:  # not a base our kernels read (e.g. trainable): bitsandbytes computes it
            return super().forward(x)
        return y.to(x.dtype)


def _unpack_cpu_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' AVX512 repacking of an already repacked weight (best effort; its scales
    stay bf16-rounded, so such a model should be reloaded)."""
    w = module.weight
    state = getattr(w, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    log.warning("a 4-bit layer was repacked by bitsandbytes' CPU inference path before we claimed it; "
                "its scales were rounded to bf16: reload the model for exact numbers")
    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, state)
    module.quant_state = w.quant_state


def claim_4bit_layers(model: nn.Module, *, own_compute: bool = True, backend: str = "auto") -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` safe on any CPU, in place; returns the count.

    Always: the AVX512-BF16 repacking is switched off (and undone where it already happened), which
    is enough for HF-stack code paths (the benchmarks' baseline, PEFT interop). With
    ``own_compute`` (our models), NF4 layers also become :class:`NF4Linear` (our dequantization and
    matmul, ``backend`` for the kernels); FP4 layers keep bitsandbytes' compute. Without it,
    :class:`NF4Linear` layers go back to plain ``Linear4bit`` (bitsandbytes computes: the HF stack)."""
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        _unpack_cpu_layout(module)
        state = getattr(module.weight, "quant_state", None)
        is_nf4 = (state.quant_type if state is not None else getattr(module.weight, "quant_type", "")) == "nf4"
        if own_compute and is_nf4 and type(module) in (bnb.nn.Linear4bit, bnb.nn.LinearNF4, NF4Linear):
            module.__class__ = NF4Linear
            module.kernel_backend = backend
        elif not own_compute and type(module) is NF4Linear:
            module.__class__ = bnb.nn.Linear4bit
        n += 1
    return n
