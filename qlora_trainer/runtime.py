"""The one place that decides device and dtypes.

bf16 matmuls on CPUs without AMX are ~20x slower than fp32 (measured: a tiny NF4+LoRA step 0.4 s in
fp32, 6.4 s in bf16), so ``auto`` computes in bfloat16 on CUDA and float32 on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qlora_trainer.errors import ConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise ``torch.device(name)``, which must exist here
    (ConfigError naming ``train.device`` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"train.device: {name!r} but this machine has no CUDA GPU that torch can use; "
                              f"set train.device=cpu (or auto)")
        if device.index is not None and device.index >= n:
            raise ConfigError(f"train.device: {name!r} but there are only {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name)


def dtype_from_name(name: str) -> torch.dtype:
    """``bfloat16`` | ``float16`` | ``float32`` -> the torch dtype."""
    return _DTYPES[name]


def launched_world() -> int:
    """Processes in this launch (``WORLD_SIZE`` set by ``accelerate launch`` / torchrun; 1 if unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_root() -> Path:
    """Root of the shared real data: ``$QLORA_DATA``, default ``../shared/data`` from the working directory
    (the repository root, where the tests and ``make`` run); never a path inside the installed package."""
    env = os.environ.get("QLORA_DATA")
    if env:
        return Path(env)
    return Path("..", "shared", "data").resolve()


def expand_path(path: str) -> str:
    """Expand ``$QLORA_DATA`` / ``${QLORA_DATA}`` (defaulting as in :func:`data_root`) and ``~``."""
    if "QLORA_DATA" in path:
        path = path.replace("${QLORA_DATA}", str(data_root())).replace("$QLORA_DATA", str(data_root()))
    return os.path.expanduser(path)
