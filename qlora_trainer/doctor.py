"""Environment report for ``qlora-trainer doctor``: what is installed and what this machine does.

Each check returns a :class:`Check` (name, status, one-line detail, optional data). Status ``ok``,
``warn`` (a run works, but slower or with a caveat) or ``error`` (a run will break: the command exits 1).

- dependency versions against the ranges this package declares (read from the installed
  distribution's metadata, so the report follows pyproject.toml);
- CUDA: torch's CUDA build, the driver, every GPU's name, capability and free memory;
- bitsandbytes: the native library actually loaded and the CPU features that change its behaviour
  (AVX512-BF16: ``Linear4bit`` repacks NF4 weights for the CPU in eval/no_grad forwards;
  AVX512F: torch's CPU capability is ``AVX512``, which selects bitsandbytes' native CPU kernels);
  our NF4 compute bypasses both (docs/bitsandbytes-cpu.md), HF-stack baselines do not;
- Triton importable and usable (a GPU, or ``TRITON_INTERPRET=1`` on the CPU);
- the ``kernels`` name: ``import kernels`` should not find our repo folder (inert under that name,
  but it hides Hugging Face's ``kernels`` package that transformers and bitsandbytes probe for),
  unless Hugging Face's is installed too: then our folder hands the name to it;
- given a config, the memory estimator's verdict for this machine's GPU;
- ``--kernels``: every Triton kernel against its torch reference here (``kernels/selfcheck.py``).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora_trainer.memory import estimate_for_config
from qlora_trainer.kernels.selfcheck import check_kernels

DIST = "qlora-trainer"
STATUSES = ("ok", "warn", "error")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | error
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _req_name(req: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(req).name


def dependency_checks(dist: str = DIST) -> list[Check]:
    """Installed version of every requirement of ``dist`` (extras included) against its specifier.

    A missing or out-of-range core dependency is an error; an extra's (``triton``, ``test``) a warning.
    """
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return [Check("install", "error", f"{dist} is not installed as a distribution (pip install -e .)")]
    out: list[Check] = []
    seen: set[str] = set()
    for text in reqs:
        req = Requirement(text)
        extra = _extra_of(req)
        key = req.name.lower()
        if key in seen:
            continue
        seen.add(key)
        bad = "error" if extra is None else "warn"
        want = str(req.specifier) or "any"
        data = {"package": req.name, "required": want, "extra": extra}
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            where = f" (extra [{extra}])" if extra else ""
            out.append(Check(f"dep:{req.name}", bad, f"not installed; needs {want}{where}", data | {"installed": None}))
            continue
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            ok = False
        status = "ok" if ok else bad
        detail = f"{have} ({want})" if ok else f"{have} is outside {want}"
        out.append(Check(f"dep:{req.name}", status, detail, data | {"installed": have}))
    return out


def _extra_of(req: Any) -> str | None:
    """The extra a requirement belongs to (``extra == "test"`` marker), or None for a core dependency."""
    if req.marker is None:
        return None
    for extra in ("triton", "test"):
        if req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            return extra
    return None


def cuda_check() -> Check:
    """torch's CUDA build, driver version and each GPU's name, capability and free/total memory."""
    import torch

    data: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "available": torch.cuda.is_available(), "gpus": []}
    if not torch.cuda.is_available():
        why = "CPU-only torch build" if torch.version.cuda is None else "no GPU visible (driver or CUDA_VISIBLE_DEVICES)"
        return Check("cuda", "warn", f"no CUDA ({why}); training runs on the CPU in fp32", data)
    data["driver"] = _driver_version()
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        data["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                             "free_gb": round(free / 1e9, 2), "total_gb": round(total / 1e9, 2)})
    g = data["gpus"][0]
    status = "ok" if torch.cuda.is_bf16_supported() else "warn"
    bf16 = "" if status == "ok" else "; no bf16 support (pre-Ampere): set model.compute_dtype=float16"
    return Check("cuda", status, f"CUDA {torch.version.cuda}, driver {data['driver']}, {len(data['gpus'])} GPU(s); "
                 f"GPU0 {g['name']} sm_{g['capability']} {g['free_gb']:.1f}/{g['total_gb']:.1f} GB free{bf16}", data)


def _driver_version() -> str | None:
    """The NVIDIA driver version through NVML (via torch's pynvml if present), else /proc."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - optional source
        pass
    p = Path("/proc/driver/nvidia/version")
    if p.is_file():
        for word in p.read_text().split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    return None


def cpu_features() -> dict[str, Any]:
    """The CPU features bitsandbytes' CPU backend branches on.

    ``avx512_bf16``: bitsandbytes' native ``has_avx512bf16`` (``Linear4bit`` then repacks its NF4 weight
    into a CPU layout on the first eval/no_grad forward). ``avx512f``: torch's CPU capability is
    ``AVX512`` (bitsandbytes uses it to pick its AVX512 kernels) or the kernel reports the flag.
    """
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    flags = _proc_cpu_flags()
    out: dict[str, Any] = {"machine": platform.machine(), "torch_cpu_capability": cap,
                           "avx512f": cap == "AVX512" or "avx512f" in flags,
                           "avx512_bf16_flag": "avx512_bf16" in flags}
    try:
        from bitsandbytes.functional import has_avx512bf16

        out["avx512_bf16"] = bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - bitsandbytes missing or broken: the flag from /proc
        out["avx512_bf16"] = out["avx512_bf16_flag"]
    return out


def _proc_cpu_flags() -> set[str]:
    p = Path("/proc/cpuinfo")
    if not p.is_file():
        return set()
    for line in p.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bitsandbytes_check() -> Check:
    """The bitsandbytes version, the native library it loaded (CUDA / CPU / none) and the CPU caveats."""
    feats = cpu_features()
    data: dict[str, Any] = {"cpu": feats}
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import BNB_BACKEND, lib
    except Exception as e:  # noqa: BLE001 - any import failure breaks NF4 loading
        return Check("bitsandbytes", "error", f"import failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                     data)
    native = getattr(getattr(lib, "_lib", None), "_name", None)
    data |= {"version": bnb.__version__, "backend": BNB_BACKEND, "native_library": native,
             "compiled_with_cuda": bool(getattr(lib, "compiled_with_cuda", False))}
    notes = []  # both branches are bypassed by our NF4 compute (docs/bitsandbytes-cpu.md); the HF stack hits them
    if feats["avx512_bf16"]:
        notes.append("AVX512-BF16: bitsandbytes' Linear4bit repacks NF4 weights for the CPU in eval/no_grad "
                     "forwards (off in our NF4Linear)")
    if feats["avx512f"]:
        notes.append("AVX512F: bitsandbytes' native CPU NF4 dequantize is wrong when in_features is not a "
                     "multiple of the blocksize (we dequantize with our own kernel)")
    data["caveats"] = notes
    lib_name = Path(native).name if native else "none (pure-torch fallback)"
    detail = f"{bnb.__version__}, backend {BNB_BACKEND}, native {lib_name}"
    status = "ok"
    import torch

    if torch.cuda.is_available() and not data["compiled_with_cuda"]:
        status, detail = "error", detail + "; a GPU is present but the CUDA library did not load"
    suffix = "; " + "; ".join(notes) + "; HF-stack baselines on this CPU are affected" if notes else ""
    return Check("bitsandbytes", status, detail + suffix, data)


def triton_check() -> Check:
    """Triton importable, and usable: a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU."""
    import torch

    spec = importlib.util.find_spec("triton")
    if spec is None:
        return Check("triton", "warn", "not installed; performance.kernels=auto uses the torch reference kernels",
                     {"installed": False})
    try:
        import triton

        version = triton.__version__
    except Exception as e:  # noqa: BLE001
        return Check("triton", "warn", f"import failed ({type(e).__name__}); torch reference kernels will run",
                     {"installed": True, "usable": False})
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    usable = torch.cuda.is_available() or interpret
    how = "CUDA" if torch.cuda.is_available() else ("interpreter (TRITON_INTERPRET=1)" if interpret else None)
    detail = f"{version}, usable on {how}" if usable else f"{version}, no GPU: kernels run as the torch reference"
    return Check("triton", "ok", detail, {"installed": True, "version": version, "usable": usable,
                                         "interpret": interpret})


def _is_our_kernels_init(path: Path) -> bool:
    """Is ``path`` our ``kernels/__init__.py``: the installed ``qlora_trainer.kernels`` one itself
    (editable install) or a file with its bytes (a checkout beside an installed wheel)?"""
    spec = importlib.util.find_spec("qlora_trainer.kernels")
    ours = Path(spec.origin) if spec and spec.origin else None
    if ours is None or not path.is_file():
        return False
    return path.resolve() == ours.resolve() or path.read_bytes() == ours.read_bytes()


def kernels_name_check() -> Check:
    """``import kernels`` must find nothing, or Hugging Face's ``kernels`` package - never our folder."""
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return Check("kernels-name", "ok", "no top-level 'kernels' module", {"origin": None})
    origin = spec.origin or (list(spec.submodule_search_locations or [None])[0])
    data = {"origin": str(origin)}
    try:
        hf = md.version("kernels")
    except md.PackageNotFoundError:
        hf = None
    if origin and _is_our_kernels_init(Path(origin)):
        ours = Path(origin).parent
        if hf:  # our folder hands the bare name to theirs (kernels/__init__.py)
            return Check("kernels-name", "ok", f"'import kernels' finds this repo's folder {ours}, which hands "
                         f"the name to Hugging Face kernels {hf}", data | {"hf_kernels": hf})
        # inert under the bare name (kernels/__init__.py), but it hides Hugging Face's package
        return Check("kernels-name", "warn", f"'import kernels' finds this repo's folder {ours} (inert under "
                     "that name, but it hides Hugging Face's kernels package from transformers and bitsandbytes; "
                     "run from another directory or drop it from PYTHONPATH)", data)
    if hf:
        return Check("kernels-name", "ok", f"Hugging Face kernels {hf} at {origin}", data | {"hf_kernels": hf})
    return Check("kernels-name", "warn", f"'import kernels' finds an unknown module at {origin}", data)


def memory_check(cfg: Any) -> Check:
    """The estimator's peak for ``cfg`` against this machine's GPU (the CPU: reported, not judged)."""
    import torch

    try:
        est = estimate_for_config(cfg)
    except Exception as e:  # noqa: BLE001 - the estimate is advisory
        return Check("memory", "warn", f"no estimate: {type(e).__name__}: {e}")
    if est is None:
        return Check("memory", "warn", f"no estimate: the shape of {cfg.model.name_or_path!r} is unknown offline")
    data = {"estimate_gb": round(est.total_gb, 3), "model": cfg.model.name_or_path}
    if not torch.cuda.is_available():
        return Check("memory", "ok", f"estimated peak {est.total_gb:.2f} GB (no GPU to compare with)", data)
    free, total = torch.cuda.mem_get_info(0)
    data |= {"gpu_total_gb": round(total / 1e9, 2), "gpu_free_gb": round(free / 1e9, 2)}
    fits = est.fits(total / 1e9)
    data["fits"] = fits
    if not fits:
        return Check("memory", "error", f"estimated peak {est.total_gb:.2f} GB does NOT fit GPU0's "
                     f"{total / 1e9:.1f} GB (shorter data.seq_len, train.batch_size=1, or checkpointing)", data)
    warn = est.total_gb > free / 1e9
    return Check("memory", "warn" if warn else "ok", f"estimated peak {est.total_gb:.2f} GB fits GPU0's "
                 f"{total / 1e9:.1f} GB" + (f" but only {free / 1e9:.1f} GB are free now" if warn else ""), data)


def config_check(cfg: Any, triton: Check) -> Check:
    """What the config asks of this machine: a CUDA device, Triton kernels."""
    import torch

    dev = cfg.train.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        return Check("config", "error", f"train.device={dev} but no CUDA device is visible; use auto or cpu")
    if dev.startswith("cuda:") and int(dev.split(":")[1] or 0) >= torch.cuda.device_count():
        return Check("config", "error", f"train.device={dev} but only {torch.cuda.device_count()} GPU(s) are visible")
    if cfg.performance.kernels == "triton" and not triton.data.get("usable"):
        return Check("config", "error", "performance.kernels=triton but Triton is not usable here (no GPU and no "
                     "TRITON_INTERPRET=1); use auto or torch")
    return Check("config", "ok", f"train.device={dev}, performance.kernels={cfg.performance.kernels}")


def kernel_checks() -> list[Check]:
    """``doctor --kernels``: every Triton kernel against its torch reference on this machine's GPU
    (bf16 and fp32), or on the CPU under ``TRITON_INTERPRET=1`` (fp32), uncached; ``error`` for a
    kernel that fails (a run would use its torch reference instead)."""
    import torch


    if torch.cuda.is_available():
        device, dtypes = torch.device("cuda"), (torch.bfloat16, torch.float32)
    elif os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        device, dtypes = torch.device("cpu"), (torch.float32,)
    else:
        return [Check("kernels", "warn", "no GPU (and no TRITON_INTERPRET=1): runs use the torch references")]
    out = []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for r in check_kernels(device, dtype, use_cache=False).values():
            detail = (f"matches its reference on {device.type} (relative error {r.rdiff:.1e})" if r.ok else
                      f"{r.reason}; runs use its torch reference")
            out.append(Check(f"kernel {r.kernel} {name}", "ok" if r.ok else "error", detail,
                             {"kernel": r.kernel, "dtype": name, "ok": r.ok, "rdiff": r.rdiff}))
    return out


def run_checks(cfg: Any | None = None, kernels: bool = False) -> list[Check]:
    """All checks, in report order; ``cfg`` adds what the config asks of the machine and the memory
    verdict; ``kernels`` every Triton kernel against its reference (:func:`kernel_checks`)."""
    triton = triton_check()
    checks = dependency_checks() + [cuda_check(), bitsandbytes_check(), triton, kernels_name_check()]
    if cfg is not None:
        checks += [config_check(cfg, triton), memory_check(cfg)]
    if kernels:
        checks += kernel_checks()
    return checks


def report(checks: list[Check]) -> dict[str, Any]:
    """JSON-ready report: every check plus ``ok`` (no error) and the CPU features."""
    cpu = next((c.data["cpu"] for c in checks if c.name == "bitsandbytes" and "cpu" in c.data), None)
    return {"ok": not any(c.status == "error" for c in checks), "python": platform.python_version(),
            "cpu": cpu if cpu is not None else cpu_features(), "checks": [asdict(c) for c in checks]}
