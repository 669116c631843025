"""Byte counts of memory/quant.py against what bitsandbytes really allocates on the CPU."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.memory.quant import adam_state_bytes, nf4_weight_bytes, quant_constant_bytes
from qlora_trainer.models.quantize import quantize_linear


def _state_bytes(qs) -> int:
    """All tensors a QuantState holds (absmax, code, offset, nested absmax and code)."""
    total = sum(t.nbytes for t in (qs.absmax, qs.code, qs.offset) if t is not None)
    if qs.state2 is not None:
        total += qs.state2.absmax.nbytes + qs.state2.code.nbytes
    return total


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((200, 300), 64), ((37, 1001), 64),
                                             ((256, 640), 128)])
def test_quant_constants_equal_bitsandbytes(shape, blocksize, double_quant):
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    q = quantize_linear(lin, compute_dtype=torch.float32, double_quant=double_quant, blocksize=blocksize)
    n = out_f * in_f
    assert q.weight.nbytes == nf4_weight_bytes(n)
    assert _state_bytes(q.weight.quant_state) == quant_constant_bytes(n, blocksize=blocksize,
                                                                      double_quant=double_quant)


def test_bits_per_param_match_qlora_paper():
    n = 4096 * 11008
    assert quant_constant_bytes(n, double_quant=False) * 8 / n == pytest.approx(0.5, abs=1e-4)
    assert quant_constant_bytes(n, double_quant=True) * 8 / n == pytest.approx(0.127, abs=1e-3)


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW32bit", "PagedAdamW8bit"])
def test_adam_state_bytes_equal_bitsandbytes(name):
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(n)) for n in (1000, 5000, 70001)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(bnb.optim, name)(params, lr=1e-3)
    opt.step()
    key = {"AdamW8bit": "adamw_8bit", "AdamW32bit": "adamw_32bit", "PagedAdamW8bit": "paged_adamw_8bit"}[name]
    for p in params:
        real = sum(v.nbytes for k, v in opt.state[p].items()
                   if torch.is_tensor(v) and k in ("state1", "state2", "absmax1", "absmax2"))
        alloc, paged = adam_state_bytes(p.numel(), optimizer=key, param_bytes=4)
        assert alloc + paged == real     # < 1e5 elements: nothing is paged, even for paged optimizers
        assert paged == 0


def test_paged_split_for_large_tensors():
    n = 200_000
    assert adam_state_bytes(n, optimizer="paged_adamw_8bit", param_bytes=2) == (8 * 782, 2 * n)
    assert adam_state_bytes(n, optimizer="paged_adamw_32bit", param_bytes=2) == (0, 8 * n)
    assert adam_state_bytes(n, optimizer="adamw", param_bytes=2) == (4 * n, 0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        adam_state_bytes(n, optimizer="sgd", param_bytes=2)
