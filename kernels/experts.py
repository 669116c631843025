"""Mixture-of-experts weights in NF4: one expert's slice of a 3-D weight stored as one NF4 tensor.

A fused expert weight W (E, out, in) (transformers 5's ``experts.gate_up_proj`` (E, 2I, H) or
``experts.down_proj`` (E, H, I)) is quantized as the 2-D (E * out, in) matrix: one bitsandbytes
block layout for all experts, blocks running over the flat (row-major) elements. Expert e is rows
[e * out, (e + 1) * out), i.e. flat elements [e * out * in, (e + 1) * out * in): whole blocks when
``out * in`` is a multiple of the blocksize (:func:`experts_quantizable`).

:func:`expert_slice` gives expert e as an ordinary (out, in) :class:`~.nf4.NF4Weight` — a view of
its packed bytes plus its blocks' fp32 scales, resolved from the double-quantized ones for that
expert only (ceil(out * in / blocksize) floats, transient) — so every NF4 path (dequantization,
:class:`~.base_weight.BaseWeight` matmuls with W recomputed in the backward) runs on one expert at a
time, never on all experts at once.
"""

from __future__ import annotations

import torch

from .nf4 import NF4Weight


def experts_quantizable(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether each expert of an (E, out, in) weight is a whole-block range of the flat storage."""
    return (out_features * in_features) % blocksize == 0 and (out_features * in_features) % 2 == 0


def expert_slice(w: NF4Weight, expert: int, num_experts: int) -> NF4Weight:
    """Expert ``expert`` of ``w`` ((E * out, in) NF4, E = ``num_experts``) as an (out, in) NF4Weight.

    packed: bytes [e * n / 2, (e + 1) * n / 2) with n = out * in (a view). Scales: blocks
    [e * n / bs, (e + 1) * n / bs); double quant resolved here as
    ``code2[absmax[b]] * absmax2[b // blocksize2] + offset`` (the same two roundings as
    :func:`~.nf4.block_scales`), so the slice is a plain (non-nested) NF4 weight."""
    rows, in_f = w.shape
    if rows % num_experts:
        raise ValueError(f"expert_slice: {rows} rows do not split into {num_experts} experts")
    out_f = rows // num_experts
    n = out_f * in_f
    if not experts_quantizable(out_f, in_f, w.blocksize):
        raise ValueError(f"expert_slice: an expert's {out_f}x{in_f} elements are not whole blocks of {w.blocksize}")
    b0, nb = expert * n // w.blocksize, n // w.blocksize
    if w.code2 is None:
        scales = w.absmax[b0:b0 + nb].float()
    else:
        blk2 = torch.arange(b0, b0 + nb, device=w.absmax.device) // w.blocksize2
        scales = w.code2[w.absmax[b0:b0 + nb].long()] * w.absmax2[blk2] + w.offset
    return NF4Weight(packed=w.packed[expert * n // 2:(expert + 1) * n // 2], absmax=scales, code=w.code,
                     code2=None, absmax2=None, offset=None, blocksize=w.blocksize, blocksize2=w.blocksize2,
                     shape=(out_f, in_f), dtype=w.dtype, quant_state=None)
