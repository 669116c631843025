"""Tensor encodings and the atomic GGUF file write shared by the model and the adapter exports.

Encodings (``outtype``): ``f32``; ``f16`` and ``bf16`` (round-to-nearest-even from fp32, as torch
rounds); ``q8_0`` (blocks of 32 values along a row: one f16 scale ``d = max|x| / 127`` and 32 int8
``round(x / d)``; a row whose length is not a multiple of 32 falls back to f16). 1-D tensors (norms,
biases, RoPE factors) stay f32 in every type, as llama.cpp's own converter writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qlora_trainer.io import atomic_file, starts_with

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
KQUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_k_s", "q4_k_m", "q5_0", "q5_k_s", "q5_k_m", "q6_k")


def file_type(outtype: str) -> Any:
    """``general.file_type`` for ``outtype``."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """``t`` (any float dtype, any shape) as ``(numpy array, raw GGML type or None)`` for
    ``GGUFWriter.add_tensor``."""
    import gguf

    t = t.detach().to("cpu")
    if t.ndim <= 1 or outtype == "f32":
        return t.float().contiguous().numpy(), None
    if outtype == "q8_0" and t.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(t.float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        return q, gguf.GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return raw, gguf.GGMLQuantizationType.BF16
    return t.to(torch.float16).contiguous().numpy(), None


def add_tensor(writer: Any, name: str, t: torch.Tensor, outtype: str) -> None:
    data, raw = encode(t, outtype)
    writer.add_tensor(name, data, raw_dtype=raw)


def write_gguf(path: Path, arch_name: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file at ``path``: ``fill(writer)`` adds keys and tensors to a ``gguf.GGUFWriter``;
    the file is written beside ``path`` and renamed over it only when complete."""
    import gguf

    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


is_gguf = starts_with(b"GGUF")  # what export's --overwrite may replace: a GGUF file


def quantize_command(gguf_path: Path, outtype: str, kind: str) -> str:
    """The llama.cpp command that makes a k-quant ``kind`` (e.g. q4_k_m) from our ``outtype`` file
    (from q8_0 it must be told to requantize; f16/bf16/f32 are the better sources)."""
    out = gguf_path.with_name(f"{gguf_path.stem}-{kind}.gguf")
    flag = "--allow-requantize " if outtype == "q8_0" else ""
    return f"llama-quantize {flag}{gguf_path} {out} {kind.upper()}"
