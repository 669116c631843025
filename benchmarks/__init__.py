"""Benchmark harness: qlora_trainer vs the HF stack (transformers + PEFT + bitsandbytes) and Unsloth.

Not part of the installed package. Run from the repository root: ``python -m benchmarks.run --help``.
"""
