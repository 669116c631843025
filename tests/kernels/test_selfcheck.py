"""The kernel self-check (``kernels/selfcheck.py``): every kernel family against its torch reference,
a failing kernel switched to its reference with one warning line, verdicts cached per device and
kernel version. On the CPU the kernels run under the Triton interpreter; on CUDA (gpu-marked) compiled."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qlora_trainer.kernels import selfcheck
from qlora_trainer.kernels.backend import clear_references, reference_kernels, resolve_backend


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "kernel-check.json"))
    clear_references()
    yield
    clear_references()


@pytest.mark.parametrize("shapes", ["aligned", "odd"])
def test_every_kernel_matches_its_reference(device, shapes):
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        for r in selfcheck.check_kernels(device, dtype, shapes=shapes, use_cache=False).values():
            assert r.ok, r


def _break_kernels(monkeypatch) -> None:
    """SwiGLU's forward kernel returns wrong values; the NF4 decode GEMM fails to compile."""
    from qlora_trainer.kernels import _triton_lora, _triton_swiglu

    def wrong(g, u):
        return torch.zeros_like(g)

    def no_compile(*a, **k):
        raise RuntimeError("PassManager::run failed\nlong compiler log")

    monkeypatch.setattr(_triton_swiglu, "swiglu_fwd", wrong)
    monkeypatch.setattr(_triton_lora, "nf4_matmul", no_compile)


def test_failing_kernel_falls_back_to_its_reference_with_one_warning(device, monkeypatch, caplog):
    from qlora_trainer.kernels.base_weight import BaseWeight
    from qlora_trainer.kernels.swiglu import swiglu, swiglu_reference

    _break_kernels(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.kernels.selfcheck"):
        res = selfcheck.ensure_kernels(device, torch.float32, ("swiglu", "nf4_decode", "rmsnorm"))
    assert res["rmsnorm"].ok and not res["swiglu"].ok and not res["nf4_decode"].ok
    assert "disagrees with its reference" in res["swiglu"].reason
    assert res["nf4_decode"].reason == "failed to run: RuntimeError: PassManager::run failed"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "swiglu disagrees" in lines[0] and "nf4_decode failed to run" in lines[0] and "rmsnorm" not in lines[0]
    assert set(reference_kernels()) == {"swiglu", "nf4_decode"}
    # the run now takes the references, whatever backend it asked for
    assert resolve_backend("triton", device, "swiglu") == "torch" and resolve_backend("triton", device, "rmsnorm") == "triton"
    g, u = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    torch.testing.assert_close(swiglu(g, u, backend="triton"), swiglu_reference(g, u))
    w = selfcheck._random_nf4(64, 128, device, torch.float32, 0)
    assert BaseWeight(nf4=w, backend="triton").path(8) == "dequant"
    # the next run checks afresh (here: from the cache, where the verdicts stay until the kernels change)
    selfcheck.ensure_kernels(device, torch.float32, ("rmsnorm",))
    assert reference_kernels() == {}


def test_verdicts_are_cached_per_device_and_kernel_version(device, monkeypatch, tmp_path):
    first = selfcheck.check_kernels(device, torch.float32, ("swiglu", "rope"))
    doc = json.loads((tmp_path / "kernel-check.json").read_text())
    key = selfcheck.cache_key(device, torch.float32, "aligned")
    assert list(doc) == [key] and set(doc[key]) == {"swiglu", "rope"}

    def must_not_run(*a, **k):
        raise AssertionError("checked again despite the cache")

    monkeypatch.setattr(selfcheck, "check_one", must_not_run)
    assert selfcheck.check_kernels(device, torch.float32, ("swiglu", "rope")) == first
    monkeypatch.setattr(selfcheck, "kernel_version", lambda: "changed")
    with pytest.raises(AssertionError, match="despite the cache"):
        selfcheck.check_kernels(device, torch.float32, ("swiglu",))
    (tmp_path / "kernel-check.json").write_text("{damaged")
    monkeypatch.undo()
    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path / "kernel-check.json"))
    assert selfcheck.check_kernels(device, torch.float32, ("swiglu",))["swiglu"].ok  # rechecked, rewritten
    assert key in json.loads((tmp_path / "kernel-check.json").read_text())


def test_run_uses_only_its_kernels():
    assert "dropout" not in selfcheck.kernels_for(dropout=False) and "nf4_gemm" not in selfcheck.kernels_for(dropout=True)
    assert set(selfcheck.kernels_for(dropout=True, nf4_matmul="fused")) == set(selfcheck.KERNELS)
    assert selfcheck.shapes_class(4096, 14336) == "aligned" and selfcheck.shapes_class(128, 352) == "odd"
