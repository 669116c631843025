"""Our kernel modules on every family whose math they match (models/adapt.py), each checked against
the family's own modules: the same loss and the same gradient for every parameter (fp32, the torch
backend; tolerance 1e-6 on the loss, 1e-5 on gradients: only the summation order may differ). The
other families keep transformers' modules, and the start-up log names them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from qlora_trainer.models.adapt import adapt_model, transformers_modules
from qlora_trainer.models.families import FAMILIES, family_config
from qlora_trainer.models.tiny import model_from_config

# family -> (norms, MLPs, attentions, decoder layers) our modules replace in the tiny 2-layer model
OURS = {"llama": (5, 2, 2, 2), "mistral": (5, 2, 2, 2), "qwen2": (5, 2, 2, 2), "qwen3": (9, 2, 2, 2),
        "qwen3_moe": (9, 0, 2, 2), "mixtral": (5, 0, 2, 2), "phi3": (5, 2, 2, 2),
        "gemma2": (9, 2, 0, 2), "gemma3": (13, 2, 2, 2), "olmo2": (9, 2, 2, 0),
        "qwen2_moe": (5, 2, 2, 2),  # the shared expert is a Qwen2 SwiGLU MLP
        "gemma": (5, 2, 0, 0), "olmo3": (9, 2, 0, 0), "granite": (5, 2, 0, 0), "smollm3": (5, 2, 0, 0),
        "glm4": (9, 2, 0, 0), "olmoe": (9, 0, 0, 0), "granitemoe": (5, 0, 0, 0),
        "cohere": (0, 2, 0, 0), "starcoder2": (0, 0, 0, 0), "phimoe": (0, 0, 0, 0)}  # LayerNorms


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapted_family_equals_its_own_modules(family, caplog):
    ref = model_from_config(family_config(family))
    for p in ref.parameters():
        p.requires_grad_(True)
    ours = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="qlora_trainer.models.adapt"):
        adapt_model(ours, "torch")
    n, m, a, d = OURS[family]
    assert f"replaced {n} RMSNorm, {m} MLP, {a} attention, {d} decoder-layer modules" in caplog.text
    kept = transformers_modules(ours)
    assert ("transformers' own modules kept" in caplog.text) == bool(kept)
    gated_mlp = family != "starcoder2"  # StarCoder2's MLP is ungated (c_fc, GELU, c_proj)
    assert not any(k.endswith(("RMSNorm", "MLP" if gated_mlp else "RMSNorm")) for k in kept)  # ours
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # PhiMoE's router samples its experts in training mode
    expected = ref(ids, labels=ids).loss
    torch.manual_seed(0)
    got = ours(ids, labels=ids).loss
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "gemma3", "phi3", "qwen2_moe"])
def test_adapted_family_generates_the_same_tokens(family):
    """Greedy decoding through the KV cache (past the sliding window where there is one) is unchanged."""
    ref = model_from_config(family_config(family)).eval()
    ref.config.use_cache = True
    ours = adapt_model(copy.deepcopy(ref), "torch").eval()
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
