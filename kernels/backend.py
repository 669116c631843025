"""Which backend runs: the Triton kernels or the torch references (no internal imports).

``backend`` is ``"auto"`` (Triton when the tensors are on CUDA and triton imports, else torch),
``"triton"`` or ``"torch"``. Callers pass the backend they were configured with; there is no
global switch, except one: a kernel that failed its self-check (``selfcheck.py``) is switched to its
reference for the rest of the run (:func:`use_reference`), whatever the backend asked for. Also the
SM count used for grid sizing.
"""

from __future__ import annotations

import torch


# kernel family -> why its torch reference runs instead (set by the self-check, read by every call site)
_REFERENCE: dict[str, str] = {}


def use_reference(kernel: str, reason: str) -> None:
    """From now on ``kernel`` (a ``selfcheck.KERNELS`` name) resolves to ``torch``, for every backend."""
    _REFERENCE[kernel] = reason


def on_reference(kernel: str) -> bool:
    """Whether ``kernel`` was switched to its torch reference."""
    return kernel in _REFERENCE


def reference_kernels() -> dict[str, str]:
    """The kernels switched to their references, with the reason each was."""
    return dict(_REFERENCE)


def clear_references() -> None:
    """Every kernel back on its configured backend (a new run checks afresh)."""
    _REFERENCE.clear()


def resolve_backend(backend: str, device: torch.device, kernel: str | None = None) -> str:
    """Map ``auto|triton|torch`` to the backend that will actually run on ``device``; ``torch`` for
    a ``kernel`` switched to its reference (:func:`use_reference`)."""
    if backend == "torch" or (kernel is not None and kernel in _REFERENCE):
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
