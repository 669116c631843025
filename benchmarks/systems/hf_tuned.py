"""``hf-tuned``: the HF stack's recipe (:mod:`benchmarks.systems.hf`) without the fp32 upcast of
embeddings, norms and lm_head that ``prepare_model_for_kbit_training`` does: the fairest HF baseline
(same weights, checkpointing, LoRA config and optimizer; 16-bit everywhere but PEFT's adapters)."""

from __future__ import annotations

from benchmarks.harness import system_main
from benchmarks.systems.hf import build

if __name__ == "__main__":
    raise SystemExit(system_main("hf-tuned", lambda spec: build(spec, upcast=False)))
