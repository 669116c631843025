"""Memory: analytic estimate before anything loads, measured per-phase peaks, the QLoRA-paper table.

- ``quant.py``: exact bitsandbytes bytes (NF4 codes, quantization constants, 8-bit AdamW state)
- ``estimate.py``: ``estimate``, ``estimate_for_config``, ``largest_fitting``, ``MemoryEstimate``
- ``references.py``: measured H100 peaks and the paper's figures (data, with sources)
- ``profile.py``: ``Profiler`` (per-phase peaks, injectable reader) and the comparison table
- ``measure.py``: real steps on a GPU with a synthetic NF4 model
- ``paper.py``: the QLoRA paper's memory breakdown next to ours (markdown + chart)
"""

from qlora_trainer.memory.estimate import (GB, GIB, PROFILES, MemoryEstimate, estimate, estimate_for_config,
                                           largest_fitting, resolve_arch)
from qlora_trainer.models.catalog import arch_from_hf_config

__all__ = ["GB", "GIB", "PROFILES", "MemoryEstimate", "arch_from_hf_config", "estimate", "estimate_for_config",
           "largest_fitting", "resolve_arch"]
