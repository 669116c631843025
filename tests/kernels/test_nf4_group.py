"""Grouped NF4 dequantization (``nf4.dequantize_nf4_group``): the members of a q/k/v or gate/up
group decode into the rows of one buffer in one Triton launch (or one reference pass), bit for bit
equal to decoding each member alone, over odd shapes, block sizes, with and without double quant."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.nf4 import MAX_GROUP, NF4Weight, dequantize_nf4, dequantize_nf4_group, nf4_groupable

# (out sizes of the members, in): q/k/v of a GQA layer (352, 96, 96) and odd ones whose element
# counts are not multiples of the block size (13 * 67 is odd: the last byte is half-used)
SHAPES = [((352, 96, 96), 67), ((13, 7, 9), 67), ((40, 24), 130), ((5,), 64)]


def _members(outs, n_in, blocksize, double_quant, device, seed=0):
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(seed)
    ws = []
    for o in outs:
        w = (torch.randn((o, n_in), generator=g) * 0.05).to(device)
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type="nf4")
        ws.append(NF4Weight.from_bnb(packed, state))
    return ws


def _memberwise(ws, dtype, backend):
    return torch.cat([dequantize_nf4(w, dtype, backend=backend) for w in ws])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("outs,n_in", SHAPES)
def test_group_decode_equals_memberwise_bit_for_bit(outs, n_in, blocksize, double_quant, dtype, device):
    ws = _members(outs, n_in, blocksize, double_quant, device)
    for backend in ("triton", "torch"):
        out = torch.full((sum(outs), n_in), float("nan"), dtype=dtype, device=device)  # every row written
        got = dequantize_nf4_group(ws, out, backend=backend)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, _memberwise(ws, dtype, backend)), backend
    if dtype == torch.float32:  # and both backends agree exactly in fp32
        assert torch.equal(got, _memberwise(ws, dtype, "triton"))


def test_group_decode_is_one_launch(device):
    from benchmarks.speed.counting import StepCounter

    ws = _members((352, 96, 96), 128, 64, True, device)
    out = torch.empty(544, 128, device=device)
    with StepCounter() as c:
        dequantize_nf4_group(ws, out, backend="triton")
    assert c.launches["dequant"] == 1 and sum(c.launches.values()) == 1


def test_ungroupable_members_are_refused():
    a = _members((8,), 64, 64, True, "cpu")[0]
    assert not nf4_groupable([a, _members((8,), 64, 128, True, "cpu")[0]])  # another blocksize
    assert not nf4_groupable([a, _members((8,), 64, 64, False, "cpu")[0]])  # no double quant
    assert not nf4_groupable([a, _members((8,), 128, 64, True, "cpu")[0]])  # another input size
    assert not nf4_groupable([a] * 4) and nf4_groupable([a] * 3)
    with pytest.raises(ValueError, match="not groupable"):
        dequantize_nf4_group([a] * 4, torch.empty(32, 64))
    from qlora_trainer.kernels._triton_nf4 import GROUP_SLOTS, nf4_dequant_group

    assert GROUP_SLOTS == MAX_GROUP  # the kernel has a slot for every member a group may have
    with pytest.raises(ValueError, match="needs contiguous"):
        nf4_dequant_group([a, a], torch.empty(64, 16).t())
