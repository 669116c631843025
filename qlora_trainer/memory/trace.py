"""Live-tensor accounting on any device: what the CUDA allocator's peak would count, measured on the CPU.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every tensor an operator returns, records the
bytes of each new storage, and subtracts them when the storage is freed (a ``weakref`` callback).
Its running maximum is the peak of *live tensor bytes*: ``torch.cuda.max_memory_allocated`` without
the allocator's 512-byte rounding, and independent of the device, so the estimator's activation
model (:mod:`qlora_trainer.memory.estimate`) can be checked on a CPU-only machine. It implements the
:class:`~qlora_trainer.memory.profile.MemoryReader` protocol, so :class:`Profiler` phases work with it.

What it does not see: tensors made before it was entered (count them with :meth:`LiveBytes.track`),
memory that kernels allocate outside PyTorch (cuBLAS/cuDNN workspaces, Triton scratch) and the
allocator's fragmentation (``reserved`` in the estimate). torch ships a heavier relative of this
(``torch.distributed._tools.mem_tracker.MemTracker``, private API, per-module snapshots on every
op); the reader protocol needs only a resettable peak, which is these few lines.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created inside ``with LiveBytes() as lb:``.

    ``lb.current`` / ``lb.max``: bytes now / the peak since the last :meth:`reset_peak`.
    ``collect_cycles``: before recording a new peak, run the garbage collector, so that tensors kept
    alive only by reference cycles are not counted (the Triton *interpreter* keeps each launch's
    arguments in one until the next collection; compiled kernels do not).
    """

    def __init__(self, collect_cycles: bool = False) -> None:
        super().__init__()
        self.current = 0
        self.max = 0
        self.collect_cycles = collect_cycles
        self._seen: dict[int, weakref.ref] = {}  # id(storage) -> weakref (callback frees the bytes)

    def track(self, *tensors: torch.Tensor) -> None:
        """Count already-existing tensors (e.g. the model's weights) as live."""
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
            return
        key = id(st)
        if key in self._seen and self._seen[key]() is st:
            return
        nbytes = st.nbytes()

        def freed(_ref: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            if self._seen.get(key) is _ref:
                del self._seen[key]
                self.current -= nbytes

        self._seen[key] = weakref.ref(st, freed)
        self.current += nbytes
        if self.current > self.max and self.collect_cycles:
            gc.collect()  # weakref callbacks of cycle-held storages lower ``current``
        self.max = max(self.max, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out

    # -- MemoryReader protocol ----------------------------------------------------------------------

    def reset_peak(self) -> None:
        self.max = self.current

    def peak(self) -> tuple[int, int]:
        """(peak live bytes, same): there is no allocator cache to report as ``reserved``."""
        return self.max, self.max


__all__ = ["LiveBytes"]
