"""Measured per-phase peaks (allocated and reserved) next to the estimate, with % error.

The memory source is injectable (:class:`MemoryReader`), so the bookkeeping and the comparison
table are tested on the CPU with a fake reader; :class:`CudaReader` reads PyTorch's CUDA allocator.
Phases: ``load``, ``adapters``, ``forward``, ``backward``, ``step`` (optimizer), ``eval``. The
estimate each phase is compared with is :meth:`MemoryEstimate.phase_bytes` for ``forward`` (the
loss moment) and the step's peak for ``backward``/``step``; the others sum the components named in
``PHASE_COMPONENTS``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from qlora_trainer.errors import QloraError
from qlora_trainer.io import atomic_file, starts_with
from qlora_trainer.memory.estimate import GIB

_STATIC = ("base_nf4", "base_16bit", "quant_constants", "embeddings", "lm_head", "norms_biases")
_ADAPTER = _STATIC + ("lora_params",)
# None = every component (the step's peak).
PHASE_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "load": _STATIC,
    "adapters": _ADAPTER,
    "forward": None,
    "backward": None,
    "step": None,
    "eval": _ADAPTER + ("lora_grads", "optimizer_states", "attention_workspace", "dequant_workspace",
                        "logits_loss"),  # looked up across both moments
}


class MemoryReader(Protocol):
    """Peak-memory source: ``reset_peak()`` then ``peak() -> (allocated_bytes, reserved_bytes)``."""

    def reset_peak(self) -> None: ...

    def peak(self) -> tuple[int, int]: ...


class CudaReader:
    """PyTorch CUDA caching-allocator peaks (``max_memory_allocated`` / ``max_memory_reserved``)."""

    def __init__(self, device=None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise QloraError("no CUDA device: memory measurement needs a GPU (the estimate works anywhere)")
        self.device = torch.device(device or "cuda")

    def reset_peak(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[int, int]:
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)


@dataclass(frozen=True)
class PhasePeak:
    phase: str
    allocated: int
    reserved: int


class Profiler:
    """Records the peak of each ``with profiler.phase(name):`` block (a phase seen twice keeps its max)."""

    def __init__(self, reader: MemoryReader | None = None) -> None:
        self.reader = reader if reader is not None else CudaReader()
        self.peaks: dict[str, PhasePeak] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.reader.reset_peak()
        yield
        alloc, res = self.reader.peak()
        old = self.peaks.get(name)
        if old is not None:
            alloc, res = max(alloc, old.allocated), max(res, old.reserved)
        self.peaks[name] = PhasePeak(name, alloc, res)

    def compare(self, est) -> list[dict]:
        """Rows ``phase, measured_allocated_gib, measured_reserved_gib, estimated_gib, error_pct``
        (error of the estimate relative to the measured allocated peak)."""
        rows = []
        for name, pk in self.peaks.items():
            keys = PHASE_COMPONENTS.get(name)
            every = {**est.components, **{k: v for p in est.phases.values() for k, v in p.items()}}
            if name == "forward" and "forward" in est.phases:
                e = est.phase_bytes("forward")
            elif keys is None:
                e = est.allocated_bytes
            else:
                e = sum(every.get(k, 0) for k in keys)
            err = 100.0 * (e - pk.allocated) / pk.allocated if pk.allocated else float("nan")
            rows.append({"phase": name, "measured_allocated_gib": pk.allocated / GIB,
                         "measured_reserved_gib": pk.reserved / GIB, "estimated_gib": e / GIB,
                         "error_pct": err})
        return rows

    def to_markdown(self, est) -> str:
        lines = ["| phase | measured allocated GiB | measured reserved GiB | estimated allocated GiB | error |",
                 "|---|---:|---:|---:|---:|"]
        for r in self.compare(est):
            lines.append(f"| {r['phase']} | {r['measured_allocated_gib']:.2f} | {r['measured_reserved_gib']:.2f}"
                         f" | {r['estimated_gib']:.2f} | {r['error_pct']:+.1f}% |")
        return "\n".join(lines)


# What ``memory --snapshot --overwrite`` may replace: a pickled snapshot (torch's ``_dump_snapshot``).
is_snapshot = starts_with(b"\x80", b"device_traces")


@contextmanager
def memory_history(path: str | None, max_entries: int = 100_000) -> Iterator[None]:
    """Record ``torch.cuda.memory._record_memory_history`` inside the block and dump a snapshot to
    ``path`` (open it at https://pytorch.org/memory_viz). No-op when ``path`` is None."""
    if path is None:
        yield
        return
    import torch

    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield
        with atomic_file(Path(path)) as tmp:  # written aside, then renamed into place
            torch.cuda.memory._dump_snapshot(str(tmp))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
