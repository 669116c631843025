"""What one benchmark process runs (``RunSpec``), shared by the runner and every system adapter.

Everything here is stdlib (+ torch, lazily) so that the Unsloth adapter can import it before ``unsloth``
(which must be imported before transformers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the runner process never needs it
    import torch

# The catalog names benchmarked on a GPU (shapes in qlora_trainer/models/catalog.py).
MODELS = ("llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-2-70b", "llama-3-70b")
# bf16 checkpoints of these fit the GPU machine's 64 GB disk; 70B ones (140 GB) are built in-process.
CHECKPOINT_MAX_PARAMS_B = 20

# Step-0 loss agreement: relative tolerance per compute dtype. All systems see the same NF4 codes of
# the same bf16 tensors and the same tokens, and LoRA B = 0 at init, so step-0 loss is the base
# model's loss. Remaining differences are rounding: the HF stack upcasts norms/embeddings/lm_head to
# fp32 (prepare_model_for_kbit_training) while ours keeps them 16-bit, and the CE reductions differ.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}

GIB = float(2**30)  # every "GB" in rows and tables is 2**30 bytes (what a "24 GB" card exposes)


@dataclass
class RunSpec:
    """One (system, model, seq_len, batch) measurement.

    model: catalog name. weights: ``checkpoint`` (load ``checkpoint_dir``, a bf16 safetensors
    directory written by benchmarks.weights) or ``in_process`` (identical tensors generated on the
    device layer by layer and quantized there; for models whose checkpoint does not fit the disk).
    warmup / steps: untimed then timed optimizer steps (each one micro-batch of ``batch`` x ``seq_len``).
    cap_gb: ``torch.cuda.set_per_process_memory_fraction`` cap (max-context probes), None = no cap.
    """

    system: str
    model: str
    seq_len: int
    batch: int = 1
    warmup: int = 3
    steps: int = 10
    seed: int = 0
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    device: str = "cuda"
    dtype: str = "bfloat16"
    weights: str = "checkpoint"
    checkpoint_dir: str | None = None
    cap_gb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype)

    @property
    def paged(self) -> bool:
        """Paged 8-bit AdamW on CUDA (the settings under test); plain torch AdamW on the CPU smoke."""
        return self.device.startswith("cuda")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunSpec":
        return cls(**json.loads(Path(path).read_text()))


def base_row(spec: RunSpec) -> dict:
    """The fields that identify a spec's result row (every row, whatever its status)."""
    return {"system": spec.system, "model": spec.model, "seq_len": spec.seq_len, "batch": spec.batch,
            "device": spec.device, "dtype": spec.dtype, "weights": spec.weights, "cap_gb": spec.cap_gb,
            **({"extra": spec.extra} if spec.extra else {})}


def make_batch(spec: RunSpec, vocab: int, device: "torch.device") -> "dict[str, torch.Tensor]":
    """The one token batch every system sees: uniform random ids from a CPU generator seeded by
    ``spec.seed`` (identical across processes and systems).

    Returns ``input_ids`` / ``labels`` (B, T) long (labels = input_ids; models shift internally) and
    ``attention_mask`` (B, T) of ones.
    """
    import torch

    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, vocab, (spec.batch, spec.seq_len), generator=g)
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def loss_rtol(dtype: str) -> float:
    return LOSS_RTOL.get(dtype, 2e-2)
