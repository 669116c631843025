"""Synthetic NF4 models: built layer by layer from meta, every decoder linear 4-bit, usable."""

from __future__ import annotations

import os

import torch
from torch import nn

from qlora_trainer.models.catalog import ArchSpec
from qlora_trainer.models.quantize import is_4bit
from qlora_trainer.models.synthetic import generator_device, synthetic_nf4_model, tensor_for


def test_tiny_all_linears_nf4_forward_and_seeded():
    m = synthetic_nf4_model("tiny", device="cpu", compute_dtype=torch.float32, seed=1)
    plain = [n for n, mod in m.named_modules() if type(mod) is nn.Linear]
    assert plain == ["lm_head"]
    assert sum(is_4bit(mod) for mod in m.modules()) == 4 * 7
    assert not any(p.is_meta or p.requires_grad for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())
    logits = m(torch.randint(0, 260, (2, 12))).logits
    assert logits.shape == (2, 12, 260) and torch.isfinite(logits).all() and logits.std() > 0
    same = synthetic_nf4_model("tiny", device="cpu", compute_dtype=torch.float32, seed=1)
    other = synthetic_nf4_model("tiny", device="cpu", compute_dtype=torch.float32, seed=2)
    w = m.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, same.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.down_proj.weight)
    emb = m.model.embed_tokens.weight  # each tensor a function of (seed, name), as benchmarks.weights writes it
    want = tensor_for("model.embed_tokens.weight", tuple(emb.shape), seed=1, device=generator_device())
    assert torch.equal(emb, want.to(emb.device, emb.dtype))


def test_custom_qwen2_shape_tied_with_biases_no_double_quant():
    arch = ArchSpec("custom", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300,
                    tied=True, family="qwen2")
    m = synthetic_nf4_model(arch, device="cpu", compute_dtype=torch.float32, double_quant=False)
    q = m.model.layers[1].self_attn.q_proj
    assert is_4bit(q) and q.bias is not None and q.weight.quant_state.state2 is None
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.isfinite(m(torch.randint(0, 300, (1, 9))).logits).all()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_peak_host_memory_far_below_16bit_model():
    """28M decoder-linear params: fp32 would be 113 MB, NF4 ~15 MB. A thread samples the resident set
    during the build; its growth must stay under half the fp32 size (one 16-bit linear at a time).
    glibc's mmap threshold is pinned at 64 KiB so freed large blocks go back to the OS and RSS tracks
    live tensors rather than heap fragmentation."""
    import ctypes
    import threading

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    synthetic_nf4_model("tiny", device="cpu", compute_dtype=torch.float32)  # warm-up
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.005)

    t = threading.Thread(target=sample)
    t.start()
    arch = ArchSpec("mid", hidden=768, intermediate=2048, layers=4, heads=8, kv_heads=8, vocab=512)
    model = synthetic_nf4_model(arch, device="cpu", compute_dtype=torch.float32)
    done.set()
    t.join()
    linear_params = 4 * (4 * 768 * 768 + 3 * 768 * 2048)
    assert sum(is_4bit(m) for m in model.modules()) == 28
    assert 0 < peak[0] - base < 0.5 * 4 * linear_params, (peak[0] - base) / 2**20
