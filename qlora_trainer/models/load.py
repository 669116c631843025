"""Load the tokenizer and the frozen (4-bit) base model named by ``model.name_or_path``.

- a hub id or local directory: ``AutoModelForCausalLM.from_pretrained`` with a ``BitsAndBytesConfig``
  (NF4, double quant, compute dtype from :mod:`qlora_trainer.runtime`), or 16-bit with
  ``model.quantization: none``; a mixture-of-experts model with fused experts in NF4 is instead
  quantized while it loads (``models/moe_load.py``: meta skeleton, safetensors streamed tensor by
  tensor, experts filled expert by expert), so its 16-bit experts never reach the device;
- ``random:<arch>``: a random model of a catalog shape built in-process (``models/tiny.py``) and
  quantized by module replacement (``models/quantize.py``).

Embeddings and ``lm_head`` are *not* upcast to fp32 (PEFT's ``prepare_model_for_kbit_training``
does; that costs ~3.5 GB extra peak on Llama-3-8B at seq 2048).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.models.check import RANDOM_PREFIX, check_model_dir, check_source, check_tokenizer_dir, is_random
from qlora_trainer.runtime import dtype_from_name, expand_path
from qlora_trainer.models.catalog import get_arch
from qlora_trainer.models.nf4_linear import claim_4bit_layers
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import byte_tokenizer, random_model
from qlora_trainer.io import first_line
from qlora_trainer.models.attention import attention_for, refused_attention
from qlora_trainer.models.moe import quantize_experts
from qlora_trainer.models.moe_load import has_experts, load_moe_nf4, model_skeleton, streams_experts
from qlora_trainer.models.attention import causal_lm_class

if TYPE_CHECKING:
    from qlora_trainer.config import Config, ModelConfig

log = logging.getLogger(__name__)

def load_tokenizer(cfg: "ModelConfig") -> Any:
    """The tokenizer for ``cfg`` with a pad token set.

    ``random:*`` models use the built-in byte tokenizer unless ``cfg.tokenizer`` names one. Without a
    pad token the existing UNK (else EOS) token is reused; ``cfg.resize_embeddings`` adds ``<pad>``
    instead (the caller then resizes the embeddings, see :func:`load_base_model`).
    """
    name = cfg.tokenizer or cfg.name_or_path
    if is_random(name):
        return byte_tokenizer()
    name = expand_path(name)
    check_source(name, "tokenizer" if cfg.tokenizer else "name_or_path")
    if Path(name).is_dir():
        check_tokenizer_dir(Path(name), "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise QloraError(f"model.tokenizer: cannot load {name!r}: {first_line(e)}") from None
    if tok.pad_token is None:
        if cfg.resize_embeddings:
            tok.add_special_tokens({"pad_token": "<pad>"})
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise QloraError(f"model.tokenizer: {name!r} has no pad, unk or eos token; "
                             f"set model.resize_embeddings=true to add one")
    return tok


def _quant_storage(name: str) -> torch.dtype:
    """``quantization.quant_storage`` as a torch dtype (``uint8`` or a float dtype name)."""
    return torch.uint8 if name == "uint8" else dtype_from_name(name)


def bnb_config(cfg: "Config", dtype: torch.dtype) -> Any:
    """``BitsAndBytesConfig`` for NF4 (double quant) with compute dtype ``dtype``."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=_quant_storage(q.quant_storage),
    )


def load_base_model(cfg: "Config", *, device: torch.device, dtype: torch.dtype,
                    vocab_size: int | None = None, stream_experts: bool = True) -> Any:
    """The frozen base ``*ForCausalLM`` on ``device``: NF4 (``model.quantization: nf4``) or ``dtype``.

    ``vocab_size`` (e.g. ``len(tokenizer)``) sets a ``random:`` model's vocabulary, or resizes a loaded
    model's embeddings when ``model.resize_embeddings`` is on and the tokenizer grew.
    ``stream_experts=False`` loads a mixture-of-experts checkpoint the old way (16-bit experts on the
    device, quantized afterwards): for comparisons only.
    """
    m = cfg.model
    if is_random(m.name_or_path):
        model = _random_base(cfg, device=device, dtype=dtype, vocab_size=vocab_size)
    else:
        model = _pretrained_base(cfg, device=device, dtype=dtype, stream_experts=stream_experts)
        emb = model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > emb:
            if not m.resize_embeddings:
                raise QloraError(f"model.tokenizer: tokenizer has {vocab_size} tokens, the model {emb}; "
                                 f"set model.resize_embeddings=true")
            model.resize_token_embeddings(vocab_size)
    for p in model.parameters():
        p.requires_grad_(False)
    if m.quantization == "nf4":  # our NF4 compute on every device, no bitsandbytes CPU repacking

        claim_4bit_layers(model)
        if cfg.quantization.quant_type == "nf4":  # fused MoE experts, which bitsandbytes leaves in 16 bits
            q = cfg.quantization
            quantize_experts(model, compute_dtype=dtype, double_quant=q.double_quant, blocksize=q.blocksize,
                             quant_storage=_quant_storage(q.quant_storage))
    model.config.use_cache = False
    return model


def _random_base(cfg: "Config", *, device: torch.device, dtype: torch.dtype, vocab_size: int | None) -> Any:
    import dataclasses

    arch_name = cfg.model.name_or_path[len(RANDOM_PREFIX):]
    try:
        arch = get_arch(arch_name)
    except (KeyError, ValueError) as e:
        raise QloraError(f"model.name_or_path: {first_line(e)}") from None
    if vocab_size is not None and vocab_size != arch.vocab:
        arch = dataclasses.replace(arch, vocab=vocab_size)
    model = random_model(arch, dtype=dtype, seed=cfg.train.seed, device="cpu",
                         attn_implementation=cfg.model.attn_implementation, attention_device=device)
    if cfg.model.quantization == "nf4":
        q = cfg.quantization
        quantize_model(model, compute_dtype=dtype, double_quant=q.double_quant, quant_type=q.quant_type,
                       quant_storage=_quant_storage(q.quant_storage), blocksize=q.blocksize)
    return model.to(device)


def _pretrained_base(cfg: "Config", *, device: torch.device, dtype: torch.dtype, stream_experts: bool) -> Any:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    name = expand_path(m.name_or_path)
    check_source(name, "name_or_path")
    if Path(name).exists():
        check_model_dir(Path(name), trust_remote_code=m.trust_remote_code)
    hf_config = _hf_config(name, m)
    if m.trust_remote_code and m.attn_implementation == "auto":  # remote classes: transformers' default
        impl = None
    else:
        impl = attention_for(hf_config, m.attn_implementation, device=device, dtype=dtype)
    kwargs: dict[str, Any] = dict(revision=m.revision, trust_remote_code=m.trust_remote_code,
                                  attn_implementation=impl, dtype=dtype, config=hf_config)
    if m.quantization == "nf4" and stream_experts:
        streamed = _streamed_moe(cfg, name, hf_config, impl=impl, device=device, dtype=dtype)
        if streamed is not None:
            return streamed
    if m.quantization == "nf4":
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise QloraError(f"model.name_or_path: cannot load {name!r}: {first_line(e)}") from None
    except ValueError as e:
        err = refused_attention(e, impl, hf_config)
        if err is None:
            raise
        raise err from None
    return model if m.quantization == "nf4" else model.to(device)


def _streamed_moe(cfg: "Config", name: str, hf_config: Any, *, impl: str | None, device: torch.device,
                  dtype: torch.dtype) -> Any:
    """A mixture-of-experts model with fused experts loaded by ``models/moe_load.py`` (quantized while
    loading, never 16-bit on the device); None for any other model (transformers + bitsandbytes)."""
    q = cfg.quantization
    if cfg.model.trust_remote_code or q.quant_type != "nf4" or not has_experts(hf_config):
        return None
    if getattr(hf_config, "quantization_config", None) is not None:  # already quantized: transformers reads it
        return None
    skeleton = model_skeleton(hf_config, dtype=dtype, attn_implementation=impl)
    if not streams_experts(skeleton, q.blocksize):
        return None
    directory = _snapshot(name, cfg.model)
    model = load_moe_nf4(directory, skeleton, dtype=dtype, device=device, double_quant=q.double_quant,
                         blocksize=q.blocksize, quant_storage=_quant_storage(q.quant_storage))
    model.config._name_or_path = name
    if (directory / "generation_config.json").is_file():  # as from_pretrained does
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def _snapshot(name: str, m: "ModelConfig") -> Path:
    """The local directory of ``name``: itself, or the hub snapshot of its config and safetensors files."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=m.revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - hub errors have many types; all mean "cannot get it"
        raise QloraError(f"model.name_or_path: cannot download {name!r}: {first_line(e)}") from None


def _hf_config(name: str, m: "ModelConfig") -> Any:
    """The transformers config of ``name`` (config.json only), checked to build a causal LM."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(name, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise QloraError(f"model.name_or_path: cannot read the config of {name!r}: {first_line(e)}") from None
    if not m.trust_remote_code:
        causal_lm_class(hf_config)
    return hf_config

