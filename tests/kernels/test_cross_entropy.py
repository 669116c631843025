"""Chunked linear + cross-entropy (Triton chunk kernel and torch chunk op) vs ``F.cross_entropy``
on full float64 logits: loss_sum, n_valid, d hidden and d weight, with ignore_index rows, an
all-ignored chunk, a partial last chunk and a vocab that is not a power of two (V = 301).

Tolerances (‖got − ref‖ / ‖ref‖ vs float64): fp32 1e-5; bf16 loss 1e-3 (fp32 softmax over bf16
logits), bf16 grads 1.5e-2 (bf16 logits, gradient and matmuls).
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

N, H, V = 21, 24, 301
TOL_LOSS = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
TOL_GRAD = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _labels(n=N):
    y = torch.randint(0, V, (n,))
    y[5:10] = -100  # with chunk_size=5 this whole chunk is ignored
    y[13] = -100
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_loss_and_grads_match_full_logits(backend, dtype, device):
    h = (torch.randn(N, H) * 2).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H) * 0.5).to(device, dtype).requires_grad_()
    y = _labels().to(device)
    loss, n_valid = linear_cross_entropy(h, w, y, chunk_size=5, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert n_valid.item() == 15
    (loss * 0.5).backward()  # the backward scales by the incoming gradient

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64, n64 = linear_cross_entropy_reference(h64, w64, y)
    (loss64 * 0.5).backward()
    assert n64.item() == 15
    assert rel_err(loss, loss64) < TOL_LOSS[dtype]
    assert h.grad.dtype == w.grad.dtype == dtype
    assert rel_err(h.grad, h64.grad) < TOL_GRAD[dtype]
    assert rel_err(w.grad, w64.grad) < TOL_GRAD[dtype]
    assert h.grad[5:10].abs().max() == 0 and h.grad[13].abs().max() == 0  # ignored rows: no grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_weight_and_3d_hidden_with_auto_chunk(backend):
    h = torch.randn(3, 7, H, requires_grad=True)
    w = torch.randn(V, H) * 0.5  # frozen lm_head: only d hidden
    y = _labels().view(3, 7)
    loss, n_valid = linear_cross_entropy(h, w, y, backend=backend)
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    loss64, _ = linear_cross_entropy_reference(h64, w.double(), y)
    loss64.backward()
    assert n_valid.item() == 15
    assert rel_err(loss, loss64) < 1e-5
    assert h.grad.shape == (3, 7, H) and rel_err(h.grad, h64.grad) < 1e-5


def test_no_grad_computes_loss_only():
    h, w, y = torch.randn(N, H), torch.randn(V, H) * 0.5, _labels()
    with torch.no_grad():
        loss, _ = linear_cross_entropy(h.requires_grad_(), w, y, chunk_size=4, backend="triton")
    assert loss.grad_fn is None
    assert rel_err(loss, linear_cross_entropy_reference(h.double(), w.double(), y)[0]) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_gives_zero_loss_and_zero_grads(backend, device):
    h = torch.randn(6, H).to(device).requires_grad_()
    w = torch.randn(V, H).to(device).requires_grad_()
    y = torch.full((6,), -100, device=device)
    loss, n_valid = linear_cross_entropy(h, w, y, chunk_size=4, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and n_valid.item() == 0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_custom_ignore_index_and_label_count_mismatch():
    h, w = torch.randn(N, H), torch.randn(V, H)
    y = _labels()
    y = y.masked_fill(y < 0, 0)
    y[:4] = 7  # ignore label 7 instead of -100
    loss, n_valid = linear_cross_entropy(h, w, y, ignore_index=7, backend="torch")
    ref, n_ref = linear_cross_entropy_reference(h, w, y, ignore_index=7)
    assert n_valid.item() == n_ref.item() == int((y != 7).sum())
    assert rel_err(loss, ref) < 1e-5
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:-1])


def test_never_materializes_full_vocab_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    n, hid = 40, 8
    h = torch.randn(n, hid, requires_grad=True)
    w = torch.randn(V, hid)
    mode = LargestOutput()
    with mode:
        loss, _ = linear_cross_entropy(h, w, torch.randint(0, V, (n,)), chunk_size=4, backend="torch")
        loss.backward()
    assert h.grad is not None
    assert mode.largest <= max(4 * V, V * hid) < n * V  # one chunk of logits (or W), never N * V


def test_auto_chunk_size_keeps_lm_head_gemms_compute_bound():
    from qlora_trainer.kernels.cross_entropy import MIN_CHUNK_ROWS, auto_chunk_size

    assert auto_chunk_size(2048, 128256, 4096) == MIN_CHUNK_ROWS == 256  # Liger's rule would give 64
    assert auto_chunk_size(8192, 32000, 4096) == 1024  # logits chunk ~ the size of h
    assert auto_chunk_size(21, 301, 24) == 21  # never more rows than there are


def test_auto_chunk_size_from_free_memory():
    from qlora_trainer.kernels.cross_entropy import FREE_FRACTION, MIN_CHUNK_ROWS, auto_chunk_size

    vocab, gib = 128256, 2**30
    rows = auto_chunk_size(2048, vocab, 4096, free_bytes=8 * gib, elt_bytes=2)
    assert int(8 * gib * FREE_FRACTION) // (vocab * 6) > 2048 and rows == 2048  # 8 GiB free: one chunk
    assert auto_chunk_size(8192, vocab, 4096, free_bytes=2 * gib) == int(2 * gib * FREE_FRACTION) // (vocab * 6)
    assert auto_chunk_size(8192, vocab, 4096, free_bytes=10**6) == MIN_CHUNK_ROWS  # nearly full: the floor
    assert auto_chunk_size(100, vocab, 4096, free_bytes=80 * gib) == 100
    # the CPU (no free-memory reading): the fixed rule
    assert auto_chunk_size(8192, 32000, 4096, free_bytes=None) == auto_chunk_size(8192, 32000, 4096) == 1024


def test_chunk_picked_from_free_memory_on_cuda(monkeypatch):
    """linear_cross_entropy reads the device's free memory when chunk_size is 0 (faked here: the
    CPU has none) and the loss is the same for any chunk."""
    import qlora_trainer.kernels.cross_entropy as ce

    assert ce.free_device_bytes(torch.device("cpu")) is None
    seen = []
    orig = ce.chunked_loss_and_grads

    def spy(hidden, weight, labels, chunk, *a):
        seen.append(chunk)
        return orig(hidden, weight, labels, chunk, *a)

    monkeypatch.setattr(ce, "chunked_loss_and_grads", spy)
    h, w, y = torch.randn(600, 16), torch.randn(50, 16), torch.randint(0, 50, (600,))
    monkeypatch.setattr(ce, "free_device_bytes", lambda device: None)
    cpu, _ = ce.linear_cross_entropy(h, w, y, backend="torch")
    monkeypatch.setattr(ce, "free_device_bytes", lambda device: 4 * 300 * 50 * 8)  # room for 300 rows
    fake, _ = ce.linear_cross_entropy(h, w, y, backend="torch")
    assert seen == [ce.auto_chunk_size(600, 50, 16), 300]
    torch.testing.assert_close(fake, cpu)


def test_free_memory_respects_the_process_cap(monkeypatch):
    """Under ``set_per_process_memory_fraction`` the chunk is sized from the cap's headroom (cap minus
    allocated), not from the card's free memory (a mocked 80 GiB card, 60 GiB free, 20 GiB allocated)."""
    from qlora_trainer.kernels import cross_entropy as ce

    gib = 1 << 30
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 20 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 1.0)
    assert ce.free_device_bytes(cuda) == 60 * gib
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 0.3)  # a 24 GiB cap
    assert ce.free_device_bytes(cuda) == 4 * gib
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 30 * gib)  # over the cap already
    assert ce.free_device_bytes(cuda) == 0
    assert ce.free_device_bytes(torch.device("cpu")) is None
