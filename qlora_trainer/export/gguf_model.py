"""A merged (dense) transformers causal LM as one llama.cpp GGUF file: hyperparameters, tokenizer,
chat template and every weight under llama.cpp's name (``export/arch.py``), encoded as ``outtype``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.export.arch import GGUFArch, extra_tensors, gguf_arch, write_hparams
from qlora_trainer.export.gguf_file import OUTTYPES, add_tensor, file_type, write_gguf
from qlora_trainer.export.vocab import build_vocab, write_vocab

_SKIP = ("rotary_emb.inv_freq",)


def is_tied(model: nn.Module) -> bool:
    """Output layer shares the input embedding (llama.cpp then reads ``token_embd`` for both)."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def gguf_tensors(model: nn.Module, a: GGUFArch) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(hf name, gguf name, tensor)`` for every weight llama.cpp loads, q/k rows permuted where the
    architecture needs it; a 4-bit or LoRA layer left in ``model`` is an error (merge first)."""
    tied = is_tied(model)
    for name, t in model.state_dict(keep_vars=False).items():
        if name.endswith(_SKIP) or (tied and name == "lm_head.weight"):
            continue
        if not t.is_floating_point() or "lora_" in name or "base_layer" in name:
            raise QloraError(f"export: {name} is not a dense weight; merge the adapter first")
        yield name, a.tensor_name(name), a.permute_rows(name, t)
    for gname, t in extra_tensors(a):
        yield gname, gname, t


def write_model_gguf(model: nn.Module, tokenizer: Any, path: Path, *, outtype: str = "f16",
                     chat_template: str | None = None, eot: str | None = None,
                     sentencepiece_model: Path | None = None, name: str | None = None) -> Path:
    """Write ``model`` (dense, any float dtype) with ``tokenizer`` to the GGUF file ``path``."""
    if outtype not in OUTTYPES:
        raise QloraError(f"export: --outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    a = gguf_arch(model.config)
    vocab = build_vocab(tokenizer, int(model.config.vocab_size), sentencepiece_model)

    def fill(writer: Any) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(path).stem)
        write_hparams(writer, a)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab, chat_template, eot)
        with torch.no_grad():
            for _, gname, t in gguf_tensors(model, a):
                add_tensor(writer, gname, t, outtype)

    return write_gguf(path, a.name, fill)
