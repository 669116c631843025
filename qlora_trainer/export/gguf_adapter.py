"""A LoRA adapter as llama.cpp's ``--lora`` GGUF file: megabytes, applied on any GGUF of the same base.

Layout (as llama.cpp's ``convert_lora_to_gguf.py`` writes it and ``llama_adapter_lora_init`` reads
it): ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, the base's
``general.architecture``, and per adapted weight ``<gguf name>.lora_a`` (r, in) and
``<gguf name>.lora_b`` (out, r), e.g. ``blk.0.attn_q.weight.lora_a``. llama.cpp adds
``(alpha / r) * B A x`` with r read from each B, so one ``alpha = s_0 r_0`` (the first layer's scale
times its rank) is written and any layer whose ``s r`` differs (rsLoRA, alpha/rank patterns) has
``s r / alpha`` folded into its B. Llama-architecture q/k B rows are permuted like the base's rows.

What such a file cannot hold is refused: DoRA (a per-row renormalisation, not an additive B A),
trained embedding rows of added tokens, and a LoRA on an output layer tied to the embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.export.arch import gguf_arch
from qlora_trainer.export.gguf_file import OUTTYPES, add_tensor, file_type, write_gguf


def check_gguf_adapter(weights: Any, base_config: Any) -> None:
    """One-line refusal of what a GGUF LoRA adapter cannot hold (see the module docstring)."""
    where = weights.name
    if weights.use_dora:
        raise QloraError(f"{where}: a DoRA adapter cannot be a GGUF LoRA adapter (llama.cpp adds B A only); "
                         f"export the merged model instead (--to gguf)")
    if weights.token_rows or weights.config.get("trainable_token_indices"):
        raise QloraError(f"{where}: the adapter trains embedding rows of added tokens, which a GGUF LoRA adapter "
                         f"cannot carry; export the merged model instead (--to gguf)")
    if getattr(base_config, "tie_word_embeddings", False) and any(n.endswith("lm_head") for n in weights.layers):
        raise QloraError(f"{where}: LoRA on lm_head of a model whose output layer is tied to the embedding has no "
                         f"tensor to attach to in llama.cpp; export the merged model instead (--to gguf)")
    if not weights.layers:
        raise QloraError(f"{where}: the adapter has no LoRA layers")


def adapter_tensors(weights: Any, base_config: Any) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """``(alpha, [(gguf name, tensor), ...])`` of a plain LoRA adapter (A (r, in), B (out, r) fp32)."""
    a = gguf_arch(base_config)
    first = next(iter(weights.layers.values()))
    alpha = float(first.scale * first.r)
    out = []
    for name, lw in weights.layers.items():
        gname = a.tensor_name(f"{name}.weight")
        b = lw.b.float()
        fold = lw.scale * lw.r / alpha
        if fold != 1.0:
            b = b * fold
        out.append((f"{gname}.lora_a", lw.a.float()))
        out.append((f"{gname}.lora_b", a.permute_rows(f"{name}.weight", b)))
    return alpha, out


def write_adapter_gguf(weights: Any, base_config: Any, path: Path, *, outtype: str = "f32",
                       name: str | None = None) -> Path:
    """Write ``weights`` (``AdapterWeights``, trained on a base with transformers config
    ``base_config``) as a llama.cpp LoRA adapter at ``path``."""
    import gguf

    if outtype not in OUTTYPES:
        raise QloraError(f"export: --outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    check_gguf_adapter(weights, base_config)
    arch = gguf_arch(base_config)
    alpha, tensors = adapter_tensors(weights, base_config)

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or Path(path).stem)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, t in tensors:
            add_tensor(writer, gname, t, outtype)

    return write_gguf(path, arch.name, fill)
