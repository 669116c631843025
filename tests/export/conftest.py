"""Builders for the export tests: a tiny byte-level BPE tokenizer trained in-process (Llama-3's or
Qwen2's split regex, chat markers as special tokens) and tiny random Llama / Qwen2 models whose
vocabulary is that tokenizer's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_trainer.export.vocab import PRE_TOKENIZERS

TEXT = ("The quick brown fox jumps over the lazy dog. 1 + 2 = 3. Hello there, how are you today? "
        "Export the model to GGUF and run it in llama.cpp, Ollama or vLLM. ") * 20
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
PROMPTS = ["Hello there, how are you?", "The lazy dog jumps over 12 foxes.", "Export to GGUF!"]


def bpe_tokenizer(pre: str = "llama-bpe", vocab_size: int = 384):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``TEXT`` with the split regex llama.cpp
    calls ``pre``; BOS ``<|begin_of_text|>`` (added to plain text), EOS ``<|end_of_text|>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = next(p for p, name in PRE_TOKENIZERS.items() if name == pre)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


def tiny_model(family: str, vocab: int, seed: int = 0, tied: bool = False) -> torch.nn.Module:
    """A random 2-layer ``family`` (llama | mistral | qwen2) model, fp32, eval mode."""
    from qlora_trainer.models.catalog import get_arch
    from qlora_trainer.models.tiny import random_model

    spec = dataclasses.replace(get_arch("tiny"), name=f"tiny-{family}", layers=2, vocab=vocab, family=family,
                               tied=tied)
    model = random_model(spec, seed=seed).eval()
    with torch.no_grad():  # random norms and biases: a wrong mapping of either shows in the logits
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else
                        0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def llama3_tok():
    return bpe_tokenizer("llama-bpe")


@pytest.fixture(scope="session")
def qwen2_tok():
    return bpe_tokenizer("qwen2")


def add_lora(model: torch.nn.Module, variant: str = "lora", seed: int = 1, r: int = 4, alpha: float = 8.0):
    """Inject a ``variant`` adapter on every linear layer of ``model`` with a random, non-zero B (an
    untrained B = 0 would hide a wrong layout). Returns its ``LoRAConfig``."""
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora import inject_lora, lora_layers

    cfg = LoRAConfig(r=r, alpha=alpha, variant=variant, dropout=0.0)
    torch.manual_seed(seed)
    inject_lora(model, cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return cfg


def save_lora(model: torch.nn.Module, cfg, path, base: str = "tiny", tokenizer=None):
    from qlora_trainer.lora import save_adapter

    return save_adapter(model, path, cfg=cfg, base_model=base, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama2_tok():
    """(the Llama-2 SentencePiece tokenizer from ``$QLORA_DATA``, its tokenizer.model); skips without it."""
    from transformers import AutoTokenizer

    from qlora_trainer.runtime import data_root

    src = data_root() / "llama2-tokenizer"
    if not (src / "tokenizer.model").is_file():
        pytest.skip(f"{src} not present")
    return AutoTokenizer.from_pretrained(str(src)), src / "tokenizer.model"
