"""Our modules in Gemma 2, Gemma 3, Phi-3 and OLMo2 (models/adapt.py) against the family's own, with
LoRA on every linear layer, on both backends (the torch references, and the Triton kernels under the
interpreter): the same loss and the same gradient for the input embeddings, every norm weight and
every LoRA A and B (fp32; random non-zero weights, Gemma's norm offsets included, B non-zero).

Tolerances: torch backend 1e-6 on the loss, 1e-5 on gradients (summation order only); Triton 1e-5 /
1e-4 relative (the kernels accumulate in another order). Each MLP replacement is also checked alone
(its input, weight and LoRA gradients), each norm is bit-identical to the family's in bf16 (where a
wrong weighting would show: in fp32 all agree), and greedy decoding through the KV cache is unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.kernels.rmsnorm import RMSNorm
from qlora_trainer.kernels.swiglu import SwiGLUMLP
from qlora_trainer.lora import inject_lora
from qlora_trainer.models.adapt import FusedDecoderLayer, RoPEAttention, adapt_model
from qlora_trainer.models.families import family_config
from qlora_trainer.models.tiny import model_from_config

FAMILIES = ("gemma2", "gemma3", "phi3", "olmo2")
TOL = {"torch": (1e-6, 1e-5), "triton": (1e-5, 1e-4)}  # (loss, gradients), relative and absolute


def _lora_model(family: str) -> torch.nn.Module:
    """The tiny model with LoRA (r 4, no dropout) on every linear layer; every weight perturbed
    (Gemma's zero-initialised norm offsets too), B non-zero; norm weights, embeddings and A/B
    trainable (the frozen base weights are checked without LoRA in test_adapt_families.py)."""
    torch.manual_seed(0)
    model = model_from_config(family_config(family))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32, backend="torch")
    for name, p in model.named_parameters():
        if "lora_" in name or "norm" in name or "embed_tokens" in name:
            p.requires_grad_(True)
            if "lora_B" in name:
                with torch.no_grad():
                    p.normal_(std=0.05)
    return model


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_with_lora_equals_its_own_modules(family, backend):
    ref = _lora_model(family)
    ours = adapt_model(copy.deepcopy(ref), backend)
    kinds = [type(m) for m in ours.modules()]
    assert kinds.count(SwiGLUMLP) == 2 and RMSNorm in kinds
    assert (RoPEAttention in kinds) == (family != "gemma2")  # Gemma 2's soft-capped attention stays
    assert kinds.count(FusedDecoderLayer) == (0 if family == "olmo2" else 2)  # the add-norm fused
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    (want, want_g), (got, got_g) = _loss_and_grads(ref, ids), _loss_and_grads(ours, ids)
    tol_loss, tol_grad = TOL[backend]
    torch.testing.assert_close(got, want, rtol=tol_loss, atol=tol_loss)
    assert set(got_g) == set(want_g)
    assert any("lora_A" in n for n in want_g) and any("lora_B" in n for n in want_g)
    assert any("norm" in n for n in want_g) and any("embed_tokens" in n for n in want_g)
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=tol_grad, atol=tol_grad, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_mlp_with_lora_equals_its_own(family, backend):
    """One layer's MLP alone (GeGLU for Gemma, the fused gate_up for Phi-3, SwiGLU for OLMo2): output,
    input gradient and every LoRA A/B gradient."""
    ref = _lora_model(family).model.layers[0].mlp
    ours = adapt_model(torch.nn.ModuleList([copy.deepcopy(ref)]), backend)[0]  # the root is never replaced
    assert isinstance(ours, SwiGLUMLP)
    assert ours.activation == ("gelu_tanh" if family.startswith("gemma") else "silu")
    assert ("gate_up_proj" in ours._modules) == (family == "phi3")
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2))
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        lora = [p for n, p in m.named_parameters() if "lora_" in n]
        outs.append([y, *torch.autograd.grad(y.square().sum(), [xi, *lora])])
    assert len(outs[0]) == 2 + 2 * (2 if family == "phi3" else 3)
    tol = TOL[backend][1]
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_round_as_the_family_does_in_bf16(family):
    """In fp32 every weighting agrees; in bf16 each family's norm (Gemma: (1 + w) in fp32, then one
    cast; OLMo2: w in fp32, then one cast; Phi-3: cast, then w) gives bit-identical outputs from our
    torch path, which the wrong weighting would not."""
    ref = model_from_config(family_config(family)).to(torch.bfloat16)
    ours = adapt_model(copy.deepcopy(ref), "torch")
    pairs = [(m, ours.get_submodule(n)) for n, m in ref.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert pairs and all(isinstance(mine, RMSNorm) for _, mine in pairs)
    g = torch.Generator().manual_seed(3)
    for hf, mine in pairs:
        with torch.no_grad():
            hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
            mine.weight.copy_(hf.weight)
        x = (torch.randn(3, 5, hf.weight.shape[0], generator=g) * 3).to(torch.bfloat16)
        assert torch.equal(mine(x), hf(x))


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_adapted_family_generates_the_same_tokens(family):
    """Greedy decoding through the KV cache with our norms, MLPs and (OLMo2) attention: unchanged.
    (Gemma 3 and Phi-3: test_adapt_families.py.)"""
    ref = model_from_config(family_config(family)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.config.use_cache = True
    ours = adapt_model(copy.deepcopy(ref), "torch").eval()
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("family,kept", [
    ("gemma2", "Gemma2TextScaledWordEmbedding x1 (embedding scaling (one multiply), left to transformers), "
               "Gemma2Attention x2 (soft-capped attention logits)"),
    ("gemma3", "Gemma3TextScaledWordEmbedding x1 (embedding scaling (one multiply), left to transformers)"),
    ("phi3", "Phi3DecoderLayer x2 (resid_pdrop > 0: dropout on each block's output before its residual add)"),
    ("olmo2", "Olmo2DecoderLayer x2 (post-norm layer: each norm precedes its residual add, no add-then-norm to fuse)"),
])
def test_startup_log_names_what_stays_transformers_and_why(family, kept, caplog):
    import logging

    cfg = family_config(family)
    if family == "phi3":
        cfg.resid_pdrop = 0.1  # its layer is fused (as Llama's) only without residual dropout
    with caplog.at_level(logging.INFO, logger="qlora_trainer.models.adapt"):
        adapt_model(model_from_config(cfg), "torch")
    assert f"transformers' own modules kept: {kept}\n" in caplog.text + "\n"
