"""Bytes bitsandbytes allocates for NF4 weights and 8-bit optimizer states (exact, per tensor).

4-bit weight (``bnb.functional.quantize_4bit``), ``n`` weights, blocksize ``b`` (default 64):

* packed codes: ``ceil(n / 2)`` bytes (two 4-bit codes per uint8; other ``quant_storage`` dtypes
  hold the same bytes);
* ``QuantState.code``: the 16-entry NF4 table, fp32 (64 B);
* without double quant: ``absmax`` fp32 per block -> ``4 * ceil(n / b)`` B = 32 / b bit/param
  (0.5 bit at b = 64);
* with double quant: ``absmax`` becomes uint8 per block (``ceil(n / b)`` B), an fp32 ``offset``
  (its mean, 4 B) and a nested blockwise state with fp32 ``absmax`` per 256 constants
  (``4 * ceil(ceil(n / b) / 256)`` B) and the 256-entry dynamic map, fp32 (1 KiB).
  Per parameter: 8/64 + 32/(64 * 256) = 0.125 + 0.00195 = 0.127 bit (the QLoRA paper's figure).

8-bit AdamW (``bnb.optim.Optimizer2State``): tensors with fewer than ``min_8bit_size`` = 4096
elements keep two fp32 states; larger ones two uint8 states plus one fp32 absmax per 256 elements
for each. Paged optimizers put a state buffer in CUDA unified memory (outside PyTorch's caching
allocator, so ``torch.cuda.memory_allocated`` never sees it) only when the tensor has >= 1e5
elements; the absmax vectors stay ordinary allocations.
"""

from __future__ import annotations

from math import ceil

NF4_CODE_BYTES = 16 * 4          # QuantState.code: 16 fp32 values
DYNAMIC_MAP_BYTES = 256 * 4      # nested state's code: bnb's 8-bit dynamic map, fp32
DQ_BLOCKSIZE = 256               # second-level blocksize bitsandbytes uses for double quant
ADAM8_BLOCKSIZE = 256            # blockwise 8-bit optimizer state blocksize
MIN_8BIT_SIZE = 4096             # bnb default: smaller tensors keep 32-bit optimizer state
PAGED_MIN_NUMEL = 100_000        # bnb: smaller state buffers are never paged


def nf4_weight_bytes(n: int) -> int:
    """Packed 4-bit codes of an ``n``-element weight."""
    return (n + 1) // 2


def quant_constant_bytes(n: int, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a 4-bit weight's QuantState tensors (absmax, code, offset, nested state)."""
    blocks = ceil(n / blocksize)
    if not double_quant:
        return 4 * blocks + NF4_CODE_BYTES
    return blocks + 4 + 4 * ceil(blocks / DQ_BLOCKSIZE) + DYNAMIC_MAP_BYTES + NF4_CODE_BYTES


def adam_state_bytes(n: int, *, optimizer: str, param_bytes: int) -> tuple[int, int]:
    """``(allocator_bytes, paged_bytes)`` of AdamW state for one ``n``-element parameter.

    optimizer: ``adamw`` (torch: two states in the parameter dtype), ``adamw_8bit``,
    ``paged_adamw_8bit``, ``adamw_32bit``, ``paged_adamw_32bit`` (bitsandbytes).
    """
    if optimizer == "adamw":
        return 2 * n * param_bytes, 0
    paged = optimizer.startswith("paged_") and n >= PAGED_MIN_NUMEL
    if optimizer.endswith("8bit") and n >= MIN_8BIT_SIZE:
        states, absmax = 2 * n, 2 * 4 * ceil(n / ADAM8_BLOCKSIZE)
        return (absmax, states) if paged else (states + absmax, 0)
    if optimizer.endswith(("8bit", "32bit")):
        return (0, 8 * n) if paged else (8 * n, 0)
    raise ValueError(f"unknown optimizer {optimizer!r}")
