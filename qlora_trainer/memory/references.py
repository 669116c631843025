"""Measured reference peaks the estimator is calibrated and tested against (data, with sources).

Units: ``allocated_gib`` is ``torch.cuda.max_memory_allocated()`` in GiB (2**30 B): PyTorch's caching
allocator only, without the CUDA context and without paged optimizer buffers (those live in CUDA
unified memory outside the allocator). ``reserved_gb`` is ``torch.cuda.max_memory_reserved()`` in
GB (1e9 B). ``paper_*`` figures are the QLoRA paper's own (Dettmers et al. 2023, appendix figure
"Breakdown of the memory footprint of different LLaMA models", MB/GB = 1e6/1e9 B).
"""

from __future__ import annotations

from dataclasses import dataclass

HF_SOURCE = ("project H100 runs of the HF stack (transformers + PEFT prepare_model_for_kbit_training "
             "+ bitsandbytes NF4/DQ, bf16 compute, SDPA, HF gradient checkpointing)")
PAPER_SOURCE = "Dettmers et al., QLoRA (arXiv:2305.14314), appendix memory-breakdown figure"


@dataclass(frozen=True)
class Reference:
    """One measured training-step peak. ``upcast``: PEFT's fp32 cast of embeddings/lm_head/norms."""

    arch: str
    seq_len: int
    batch: int
    r: int
    optimizer: str
    upcast: bool
    allocated_gib: float
    source: str = HF_SOURCE


# bs 1, LoRA r 16 on all linear layers, gradient checkpointing, paged AdamW 8-bit.
HF_PEAKS: list[Reference] = [
    Reference("llama-2-7b", 512, 1, 16, "paged_adamw_8bit", True, 5.1),
    Reference("llama-2-13b", 512, 1, 16, "paged_adamw_8bit", True, 8.7),
    Reference("llama-33b", 512, 1, 16, "paged_adamw_8bit", True, 19.2),
    Reference("llama-65b", 512, 1, 16, "paged_adamw_8bit", True, 36.3),
    Reference("llama-2-70b", 512, 1, 16, "paged_adamw_8bit", True, 38.1),
    Reference("llama-3-70b", 512, 1, 16, "paged_adamw_8bit", True, 45.9),
    Reference("llama-3-8b", 2048, 1, 16, "paged_adamw_8bit", True, 12.5),
    Reference("llama-3-8b", 2048, 1, 16, "paged_adamw_8bit", False, 9.0),
]

# Capacity statements from the same runs (allocated basis, 48 GiB): (arch, largest seq that fits,
# smallest seq that does not).
HF_CAPACITY_48: list[tuple[str, int | None, int]] = [
    ("llama-2-70b", 3072, 4096),
    ("llama-3-70b", 512, 1024),
]


@dataclass(frozen=True)
class PaperRow:
    """QLoRA-paper setting: bs 1, seq 512, r 64, alpha 16, paged AdamW 32-bit, all linear layers,
    gradient checkpointing. ``paper_*`` from the paper; ``hf_*`` from the HF stack on an H100."""

    arch: str
    paper_total_gb: float
    paper_base_mb: float
    hf_reserved_gb: float
    hf_allocated_gib: float


PAPER_ROWS: list[PaperRow] = [
    PaperRow("llama-7b", 6.9, 5046, 6.6, 5.75),
    PaperRow("llama-13b", 11.3, 8476, 11.0, 9.75),
    PaperRow("llama-33b", 24.7, 19302, 24.0, 21.4),
    PaperRow("llama-65b", 45.0, 37074, 44.5, 40.0),
]
PAPER_SETTINGS = dict(seq_len=512, batch=1, lora_r=16 * 4, optimizer="paged_adamw_32bit",
                      checkpointing=True, targets="all-linear")
