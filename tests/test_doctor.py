"""``qlora-trainer doctor``: CPU features as bitsandbytes sees them, dependency ranges, the ``kernels``
name, the memory verdict, and exit 1 on a problem that breaks a run."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
from pathlib import Path

import pytest

from qlora_trainer import doctor
from qlora_trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs /proc/cpuinfo (Linux)")
def test_doctor_json_reports_cpu_features(capsys):
    import torch
    from bitsandbytes.functional import has_avx512bf16

    rc = main(["doctor", "--json"])
    rep = json.loads(capsys.readouterr().out)
    cpu = rep["cpu"]
    flags = _flags()
    assert cpu["avx512_bf16"] is bool(has_avx512bf16())
    assert cpu["avx512_bf16_flag"] is ("avx512_bf16" in flags)
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["avx512f"] is (cpu["torch_cpu_capability"] == "AVX512" or "avx512f" in flags)
    bnb = next(c for c in rep["checks"] if c["name"] == "bitsandbytes")
    caveats = bnb["data"]["caveats"]
    assert any("repacks" in n for n in caveats) is cpu["avx512_bf16"]
    assert any("in_features" in n for n in caveats) is cpu["avx512f"]
    assert bnb["status"] == "ok"  # our NF4 compute bypasses both branches (docs/bitsandbytes-cpu.md)
    simulated = os.environ.get("QLORA_SIMULATE_CPU")  # make test-lowest hides AVX512 from torch and bitsandbytes
    if {"avx512_bf16", "avx512f"} <= flags and not simulated:  # this dev/CI machine: both reported
        assert cpu["avx512_bf16"] and cpu["avx512f"] and cpu["torch_cpu_capability"] == "AVX512"
    assert bnb["data"]["backend"] in ("CPU", "CUDA", "ROCm", "XPU")
    names = {c["name"] for c in rep["checks"]}
    assert {"dep:torch", "dep:bitsandbytes", "dep:transformers", "cuda", "triton", "kernels-name"} <= names
    assert rc == (0 if rep["ok"] else 1)


def test_dependency_out_of_range_is_an_error_and_extras_warn(monkeypatch):
    monkeypatch.setattr(doctor.md, "requires", lambda _: ["torch>=99", 'peft>=0.13; extra == "test"',
                                                          'nosuchpkg-xyz>=1; extra == "test"'])
    checks = {c.name: c for c in doctor.dependency_checks()}
    assert checks["dep:torch"].status == "error" and "outside >=99" in checks["dep:torch"].detail
    assert checks["dep:peft"].status == "ok"
    assert checks["dep:nosuchpkg-xyz"].status == "warn" and "not installed" in checks["dep:nosuchpkg-xyz"].detail


def test_error_check_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "dependency_checks", lambda: [doctor.Check("dep:torch", "error", "0.1 is outside >=2")])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] dep:torch" in out and "problems that break a run: dep:torch" in out


def test_kernels_folder_on_path_is_reported(monkeypatch):
    sys.modules.pop("kernels", None)
    clean = [p for p in sys.path if p not in ("", ".") and Path(p or ".").resolve() != ROOT]
    monkeypatch.setattr(sys, "path", clean)
    assert doctor.kernels_name_check().status == "ok"
    monkeypatch.setattr(sys, "path", [str(ROOT)] + clean)  # e.g. `python -m ...` run from the repo root
    c = doctor.kernels_name_check()
    try:
        hf = md.version("kernels")  # transformers >= 5.25 requires Hugging Face's package
    except md.PackageNotFoundError:
        hf = None
    if hf:
        assert c.status == "ok" and "repo's folder" in c.detail
        assert f"hands the name to Hugging Face kernels {hf}" in c.detail
    else:
        assert c.status == "warn" and "repo's folder" in c.detail and "hides Hugging Face's kernels" in c.detail


def test_memory_verdict_with_a_config(capsys):
    assert main(["doctor", str(ROOT / "configs" / "demo.yaml"), "--json"]) in (0, 1)
    mem = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "memory")
    assert mem["data"]["estimate_gb"] > 0
    assert mem["status"] == "ok" or "fit" in mem["detail"]


def test_config_asking_for_cuda_on_a_cpu_machine_fails(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["doctor", str(ROOT / "configs" / "demo.yaml"), "train.device=cuda"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] config: train.device=cuda but no CUDA device is visible" in out


def test_doctor_kernels_checks_every_kernel_on_demand(capsys, monkeypatch, tmp_path):
    """``doctor --kernels`` on the CPU (interpreter): one line per kernel, a wrong kernel an error
    (exit 1) that names it; nothing cached (on demand means run now)."""
    from qlora_trainer.kernels import _triton_swiglu
    from qlora_trainer.kernels.selfcheck import CACHE_ENV, KERNELS

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache.json"))
    monkeypatch.setattr(_triton_swiglu, "swiglu_fwd", lambda g, u: g * 0)
    checks = doctor.kernel_checks()
    assert [c.data["kernel"] for c in checks] == list(KERNELS)
    bad = [c for c in checks if c.status == "error"]
    assert [c.name for c in bad] == ["kernel swiglu float32"] and "runs use its torch reference" in bad[0].detail
    assert not (tmp_path / "cache.json").exists()
    monkeypatch.setattr(doctor, "kernel_checks", lambda: bad)
    assert main(["doctor", "--kernels"]) == 1
    assert "kernel swiglu float32: disagrees with its reference" in capsys.readouterr().out
