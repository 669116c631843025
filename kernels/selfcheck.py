"""Each Triton kernel checked once against its torch reference on this device, before a run uses it.

:func:`check_kernels` runs every kernel family a run will use (:data:`KERNELS`) on small inputs of the
run's dtype, forward and gradients, with the Triton kernel and with the torch reference, and compares
them (‖kernel − reference‖ / ‖reference‖ per tensor, at most :data:`TOL` of the dtype). A kernel that
fails to compile, raises, returns non-finite values or disagrees is switched to its reference for the
rest of the process (``backend.use_reference``: every call site asks ``resolve_backend`` with its
kernel's name) and :func:`ensure_kernels` logs one warning line saying which and why.

Results are cached in a small JSON file (:func:`cache_path`, written atomically) keyed by device name
and capability, torch and triton versions, a hash of this folder's sources (the kernel version), the
dtype and the shapes class, so a run pays the check once per machine and kernel version: milliseconds
after the first time. ``qlora-trainer doctor --kernels`` runs the same check on demand (uncached).

The inputs are tiny (tens of rows) in two shape classes: ``aligned`` (every size a multiple of the
NF4 blocksize, as in real models) and ``odd`` (sizes that leave partial tiles and blocks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .backend import _REFERENCE, clear_references, use_reference
from qlora_trainer.kernels.cross_entropy import linear_cross_entropy
from qlora_trainer.kernels.dropout import dropout_apply
from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_group, dequantize_nf4_reference
from qlora_trainer.kernels.rmsnorm import add_rms_norm, rms_norm
from qlora_trainer.kernels.rope import apply_rope
from qlora_trainer.kernels.swiglu import gated_fused, swiglu

log = logging.getLogger(__name__)

# kernel family -> what runs it (the names every ``resolve_backend`` call site passes)
KERNELS = ("nf4_dequant", "nf4_decode", "nf4_gemm", "rmsnorm", "swiglu", "geglu", "rope", "cross_entropy",
           "dropout")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative norm error per tensor
CACHE_ENV = "QLORA_KERNEL_CACHE"  # a file path overriding the default cache location


@dataclass(frozen=True)
class KernelCheck:
    """One kernel's verdict: ``ok``, the largest relative error seen (None when it did not run) and,
    when not ok, ``reason`` (one line)."""

    kernel: str
    ok: bool
    rdiff: float | None = None
    reason: str = ""


def kernels_for(*, dropout: bool, nf4_matmul: str = "dequant") -> tuple[str, ...]:
    """The kernel families a training run uses: all but dropout's without LoRA dropout, and the
    fused NF4 GEMM only when ``model.nf4_matmul`` is ``fused``."""
    skip = ({"dropout"} if not dropout else set()) | ({"nf4_gemm"} if nf4_matmul != "fused" else set())
    return tuple(k for k in KERNELS if k not in skip)


def shapes_class(*sizes: int) -> str:
    """``aligned`` when every size is a multiple of 64 (an NF4 block; every real model), else ``odd``."""
    return "aligned" if all(n % 64 == 0 for n in sizes) else "odd"


def _gen(device: torch.device, seed: int) -> Callable[..., torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    return randn


def _random_nf4(out_f: int, in_f: int, device: torch.device, dtype: torch.dtype, seed: int):
    """An NF4 weight (out_f, in_f), double-quantized, blocksize 64, with random codes and scales
    (bitsandbytes' layout; no quantizer needed: the check compares two decoders of the same bytes)."""

    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f
    n_blocks = -(-n // 64)
    code = torch.linspace(-1.0, 1.0, 16)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
    code2 = torch.linspace(-1.0, 1.0, 256)
    absmax2 = torch.rand(-(-n_blocks // 256), generator=g) * 0.1 + 0.05
    to = {"device": device}
    return NF4Weight(packed=packed.to(**to), absmax=absmax.to(**to), code=code.to(**to), code2=code2.to(**to),
                     absmax2=absmax2.to(**to), offset=torch.tensor(0.1, device=device), blocksize=64,
                     blocksize2=256, shape=(out_f, in_f), dtype=dtype, quant_state=None)


def _sizes(shapes: str) -> dict[str, int]:
    """(tokens, in, out, hidden, heads' dim) per shape class."""
    if shapes == "aligned":
        return {"m": 8, "m_large": 96, "k": 128, "n": 192, "h": 128, "d": 32}
    return {"m": 7, "m_large": 83, "k": 96, "n": 160, "h": 96, "d": 32}


def _with_grads(outs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """outs, then d(sum of outs · fixed cotangents)/d inputs (the backward kernels)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs] + list(grads)


def _case(kernel: str, device: torch.device, dtype: torch.dtype, shapes: str) -> Callable[[str], list[torch.Tensor]]:
    """``run(backend) -> tensors`` for ``kernel``: the same inputs each call, ``backend`` triton|torch."""
    s = _sizes(shapes)
    r = _gen(device, 0)
    if kernel == "rmsnorm":

        x, res, w = r(s["m"], s["h"], dtype=dtype), r(s["m"], s["h"], dtype=dtype), r(s["h"], dtype=dtype)

        def run(b: str) -> list[torch.Tensor]:
            xs = [t.detach().clone().requires_grad_(True) for t in (x, res, w)]
            y1 = rms_norm(xs[0], xs[2], 1e-5, backend=b)
            y2, summed = add_rms_norm(xs[0], xs[1], xs[2], 1e-5, backend=b)
            y3 = rms_norm(xs[0], xs[2], 1e-5, backend=b, offset=1.0, weight_fp32=True)  # Gemma's weighting
            return _with_grads([y1, y2, summed, y3], xs, 1)
    elif kernel in ("swiglu", "geglu"):

        gate, up = r(s["m"], s["n"], dtype=dtype), r(s["m"], s["n"], dtype=dtype)
        act = "silu" if kernel == "swiglu" else "gelu_tanh"

        def run(b: str) -> list[torch.Tensor]:
            xs = [t.detach().clone().requires_grad_(True) for t in (gate, up)]
            fused = torch.cat([gate, up], dim=-1).requires_grad_(True)  # one gate/up projection (Phi-3)
            outs = [swiglu(*xs, backend=b, activation=act), gated_fused(fused, backend=b, activation=act)]
            return _with_grads(outs, [*xs, fused], 1)
    elif kernel == "rope":

        q, k = r(1, s["m"], 4, s["d"], dtype=dtype), r(1, s["m"], 2, s["d"], dtype=dtype)
        ang = torch.arange(s["m"], device=device)[:, None].float() * torch.linspace(0.01, 1.0, s["d"], device=device)
        cos, sin = ang.cos()[None].to(dtype), ang.sin()[None].to(dtype)

        def run(b: str) -> list[torch.Tensor]:
            xs = [t.detach().clone().requires_grad_(True) for t in (q, k)]
            return _with_grads(list(apply_rope(xs[0], xs[1], cos, sin, backend=b)), xs, 1)
    elif kernel == "cross_entropy":

        hid, w = r(s["m_large"], s["h"], dtype=dtype), r(s["n"] + 40, s["h"], dtype=dtype) * 0.1
        labels = torch.randint(0, s["n"] + 40, (s["m_large"],), generator=torch.Generator().manual_seed(2))
        labels[:5] = -100
        labels = labels.to(device)

        def run(b: str) -> list[torch.Tensor]:
            xs = [t.detach().clone().requires_grad_(True) for t in (hid, w)]
            loss, _ = linear_cross_entropy(xs[0], xs[1], labels, chunk_size=32, backend=b)
            return _with_grads([loss.reshape(1)], xs, 1)
    elif kernel == "dropout":

        t = r(s["m"], s["n"], dtype=dtype)
        seed = torch.tensor([1234567], dtype=torch.int64, device=device)

        def run(b: str) -> list[torch.Tensor]:
            return [dropout_apply(t, seed, 0.1, backend=b)]
    elif kernel == "nf4_dequant":

        ws = [_random_nf4(s["n"], s["k"], device, dtype, i) for i in range(2)]

        def run(b: str) -> list[torch.Tensor]:
            out = torch.empty(2 * s["n"], s["k"], dtype=dtype, device=device)
            return [dequantize_nf4(ws[0], dtype, backend=b), dequantize_nf4_group(ws, out, backend=b)]
    elif kernel in ("nf4_decode", "nf4_gemm"):

        w = _random_nf4(s["n"], s["k"] if kernel == "nf4_decode" else 2 * s["k"], device, dtype, 3)
        m = s["m"] if kernel == "nf4_decode" else s["m_large"]
        x, dy, bias = r(m, w.shape[1], dtype=dtype), r(m, w.shape[0], dtype=dtype), r(w.shape[0], dtype=dtype)

        def run(b: str) -> list[torch.Tensor]:
            if b == "torch":
                wt = dequantize_nf4_reference(w, dtype)
                return [torch.addmm(bias, x, wt.t()), dy @ wt]
            if kernel == "nf4_decode":
                from ._triton_lora import nf4_matmul as mm
            else:
                from ._triton_nf4_gemm import nf4_gemm as mm
            return [mm(x, w, trans_w=True, bias=bias), mm(dy, w, trans_w=False)]
    else:
        raise ValueError(f"kernel self-check: unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
    return run


@contextlib.contextmanager
def _unswitched(kernel: str) -> Iterator[None]:
    """``kernel`` on its Triton path while it is checked, even if an earlier check switched it."""
    reason = _REFERENCE.pop(kernel, None)
    try:
        yield
    finally:
        if reason is not None:
            _REFERENCE[kernel] = reason


def _rdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_one(kernel: str, device: torch.device, dtype: torch.dtype, shapes: str = "aligned") -> KernelCheck:
    """Run ``kernel`` with Triton and with its torch reference on the same inputs; never raises."""
    try:
        run = _case(kernel, device, dtype, shapes)
        want = run("torch")
        with _unswitched(kernel):
            got = run("triton")
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run is a verdict, not a crash
        first = (str(e).strip().splitlines() or [""])[0][:200]  # compiler logs run to pages: their first line
        return KernelCheck(kernel, False, None, f"failed to run: {type(e).__name__}: {first}")
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return KernelCheck(kernel, False, None, "returned tensors of other shapes than its reference")
    if not all(torch.isfinite(g.float()).all() for g in got):
        return KernelCheck(kernel, False, None, "returned non-finite values")
    worst = max(_rdiff(g, w) for g, w in zip(got, want))
    tol = TOL.get(dtype, 2e-2)
    if worst > tol:
        return KernelCheck(kernel, False, worst,
                           f"disagrees with its reference (relative error {worst:.2e} > {tol:.0e})")
    return KernelCheck(kernel, True, worst)


def kernel_version() -> str:
    """A hash of this folder's sources: a changed kernel is checked again."""
    h = hashlib.sha1()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(device: torch.device, dtype: torch.dtype, shapes: str) -> str:
    """Device name and capability, torch / triton versions, kernel version, dtype, shapes class."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        name, cap = device.type, "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "-"
    return "|".join([name, cap, f"torch {torch.__version__}", f"triton {tv}", kernel_version(), str(dtype), shapes])


def cache_path() -> Path:
    """``$QLORA_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/qlora_trainer/kernel-check.json`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qlora_trainer" / "kernel-check.json"


def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: checked again, rewritten


def _write_cache(path: Path, doc: dict) -> None:
    """Atomically (a temporary file beside it, then a rename); an unwritable cache is only slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernel-check-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("kernel self-check: cache %s not written (%s)", path, e)


def check_kernels(device: torch.device, dtype: torch.dtype, kernels: tuple[str, ...] = KERNELS, *,
                  shapes: str = "aligned", use_cache: bool = True) -> dict[str, KernelCheck]:
    """Each of ``kernels`` checked (:func:`check_one`), or its verdict read from the cache."""
    path = cache_path()
    doc = _read_cache(path) if use_cache else {}
    key = cache_key(device, dtype, shapes)
    known = doc.get(key, {})
    out, fresh = {}, False
    for k in kernels:
        if use_cache and isinstance(known.get(k), dict):
            with contextlib.suppress(TypeError):
                out[k] = KernelCheck(**known[k])
                continue
        out[k] = check_one(k, device, dtype, shapes)
        fresh = True
    if use_cache and fresh:
        doc = _read_cache(path)  # another process may have added other keys meanwhile
        doc[key] = {**doc.get(key, {}), **{k: asdict(v) for k, v in out.items()}}
        _write_cache(path, doc)
    return out


def ensure_kernels(device: torch.device, dtype: torch.dtype, kernels: tuple[str, ...] = KERNELS, *,
                   shapes: str = "aligned", use_cache: bool = True) -> dict[str, KernelCheck]:
    """Model preparation's check: every failed kernel switched to its torch reference for this
    process, one warning line for them; the earlier run's switches cleared first."""
    clear_references()
    results = check_kernels(device, dtype, kernels, shapes=shapes, use_cache=use_cache)
    bad = [r for r in results.values() if not r.ok]
    for r in bad:
        use_reference(r.kernel, r.reason)
    if bad:
        log.warning("Triton kernels switched to their torch references on %s (%s): %s", device,
                    str(dtype).removeprefix("torch."), "; ".join(f"{r.kernel} {r.reason}" for r in bad))
    return results
