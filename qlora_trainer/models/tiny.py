"""Models and a tokenizer made in-process: no download, ever.

``random:<arch>`` model paths build a randomly initialised transformers model from the catalog;
small ones get the byte-level tokenizer below (256 byte tokens + 4 specials = the ``tiny`` vocab).
"""

from __future__ import annotations

import torch

from qlora_trainer.models.catalog import ArchSpec, get_arch
from qlora_trainer.models.attention import attention_for, causal_lm_class, refused_attention

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 256..259


def byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: every UTF-8 byte is one token (ids 0-255),
    specials ``<unk> <s> </s> <pad>`` are 256-259. EOS ``</s>``, BOS ``<s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def random_model(arch: ArchSpec | str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                 device: torch.device | str = "cpu", attn_implementation: str = "auto",
                 attention_device: torch.device | str | None = None):
    """A randomly initialised ``*ForCausalLM`` of the catalog shape ``arch`` (small shapes only:
    it is materialised in ``dtype``; full-size models come from the synthetic NF4 builder).
    ``attn_implementation``: as ``model.attn_implementation`` (``auto``: models/attention.py, for a
    model run on ``attention_device``, default ``device``)."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    cfg = arch.to_hf_config()
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (257, 258, 259) if arch.vocab == 260 else (1, 2, None)
    return model_from_config(cfg, dtype=dtype, seed=seed, device=device, attn_implementation=attn_implementation,
                             attention_device=attention_device)


def model_from_config(cfg, *, dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu",
                      attn_implementation: str = "auto", attention_device: torch.device | str | None = None):
    """A randomly initialised ``*ForCausalLM`` for the transformers config ``cfg`` (any family
    transformers ships), seeded, in ``dtype``, with the attention :mod:`models.attention` chooses.
    A family transformers cannot build as a causal LM, or an attention it refuses: one-line QloraError."""
    from transformers import AutoModelForCausalLM

    causal_lm_class(cfg)
    impl = attention_for(cfg, attn_implementation, device=attention_device or device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=impl)
        except ValueError as e:
            err = refused_attention(e, impl, cfg)
            if err is None:
                raise
            raise err from None
    return model.to(device)
