"""Which backend runs: the Triton kernels or the torch references (no internal imports).

``backend`` is ``"auto"`` (Triton when the tensors are on CUDA and triton imports, else torch),
``"triton"`` or ``"torch"``. Callers pass the backend they were configured with; there is no
global switch. Also the SM count used for grid sizing.
"""

from __future__ import annotations

import torch


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto|triton|torch`` to the backend that will actually run on ``device``."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return "triton"
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (grid sizing); 4 under the CPU interpreter,
    so that a few programs still exercise the multi-program paths."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
