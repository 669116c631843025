"""Sequence-tiled MLP (``performance.mlp_chunk_tokens``): same logits and gradients as the untiled MLP,
LoRA dropout masks reproduced by the (nested) recomputes, fewer saved bytes, and the estimator's
layer_recompute shrinks accordingly.

Tolerances (fp32 tiny models, torch backend): logits rtol/atol 1e-5; gradients rtol 1e-4 /
atol 1e-6 (tiling only changes the row blocking of the matmuls, so differences are rounding).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from qlora_trainer.config import LoRAConfig, load_config
from qlora_trainer.errors import ConfigError
from qlora_trainer.kernels.swiglu import SwiGLUMLP
from qlora_trainer.lora import inject_lora
from qlora_trainer.memory.estimate import estimate, estimate_for_config
from qlora_trainer.models.adapt import adapt_model
from qlora_trainer.models.catalog import get_arch
from qlora_trainer.models.checkpointing import apply_checkpointing

T, CHUNK = 29, 7  # 5 chunks, the last one 1 token
# the module (``qlora_trainer.kernels.swiglu`` the attribute is the re-exported function)
swiglu_mod = importlib.import_module("qlora_trainer.kernels.swiglu")


def _lora(model: nn.Module, dropout: float) -> nn.Module:
    """All-linear LoRA (r 4, fp32) with random B so adapters (and their dropout) change outputs."""
    model = copy.deepcopy(model).train()
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout), dtype=torch.float32, backend="torch")
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model


def _build(base: nn.Module, chunk: int, checkpointing: bool) -> nn.Module:
    model = adapt_model(copy.deepcopy(base), "torch", mlp_chunk_tokens=chunk)
    if checkpointing:
        apply_checkpointing(model)
    return model.train()


def _logits_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 123):
    """Logits (B, T, V) and the trainable params' grads of loss = mean(logits^2), RNG seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1]) and want[1]
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, T))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_nf4_model"])
def test_tiled_equals_untiled_with_checkpointing(fixture, request):
    """Dropout 0 (so masks cannot differ): tiled + per-layer checkpointing == untiled, no checkpointing."""
    base = _lora(request.getfixturevalue(fixture), dropout=0.0)
    ids = _ids()
    tiled = _build(base, CHUNK, checkpointing=True)
    assert [m.chunk_tokens for m in tiled.modules() if isinstance(m, SwiGLUMLP)] == [CHUNK] * 4
    _assert_same(_logits_and_grads(tiled, ids), _logits_and_grads(_build(base, 0, False), ids))


def test_dropout_masks_reproduced_by_nested_recompute(tiny_model, monkeypatch):
    """LoRA dropout 0.2: tiled MLP inside per-layer checkpoints (the masks are drawn three times:
    forward, layer recompute, chunk recompute) == the same chunked computation with no
    checkpoint anywhere (same RNG stream, each mask drawn once). Dropout visibly matters."""
    base = _lora(tiny_model, dropout=0.2)
    ids = _ids()
    got = _logits_and_grads(_build(base, CHUNK, checkpointing=True), ids)
    other_seed = _logits_and_grads(_build(base, CHUNK, checkpointing=True), ids, seed=7)
    assert (got[0] - other_seed[0]).abs().max() > 1e-3  # masks differ by seed: dropout is live
    monkeypatch.setattr(swiglu_mod, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    want = _logits_and_grads(_build(base, CHUNK, checkpointing=False), ids)
    _assert_same(got, want)


def _saved_bytes(mlp: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves for backward (outside any checkpoint) during one forward of ``mlp``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    return total, y


def test_tiled_mlp_saves_less():
    """H 32, I 128, T 512, chunk 16, fp32: untiled saves x twice (gate, up inputs), gate, up,
    silu(gate), product and the 3 weights = 4*T*I*4 + 2*T*H*4 + 3*H*I*4 B (1.23 MB); tiled saves
    only the chunk inputs for the checkpoints (views of x: T*H*4 B = 64 KiB, no new memory); each
    chunk's (1, 16, I) intermediates are dropped and rebuilt one chunk at a time in backward."""
    h, i, t = 32, 128, 512
    torch.manual_seed(0)
    lins = [nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)]
    x = torch.randn(1, t, h, requires_grad=True)
    results = []
    for chunk in (0, 16):
        mlp = SwiGLUMLP(*copy.deepcopy(lins), backend="torch", chunk_tokens=chunk)
        saved, y = _saved_bytes(mlp, x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        results.append((saved, y.detach(), gx))
    (untiled, y0, g0), (tiled, y1, g1) = results
    assert untiled == 4 * t * i * 4 + 2 * t * h * 4 + 3 * h * i * 4
    assert tiled == t * h * 4
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_estimator_mlp_chunk_shrinks_layer_recompute():
    """llama-3-70b, 24k tokens, offload, dropout 0.05 (ours: the mask costs nothing): chunk 4096
    drops (24000 - 4096) tokens of 3 bf16 intermediate tensors from the recompute, and of 2
    intermediate- plus 2 hidden-wide gradients from the MLP backward."""
    arch = get_arch("llama-3-70b")
    h, i = arch.hidden, arch.intermediate
    base = estimate(arch, seq_len=24000, offload=True)
    tiled = estimate(arch, seq_len=24000, offload=True, mlp_chunk=4096)
    saved = base.phases["backward"]["layer_recompute"] - tiled.phases["backward"]["layer_recompute"]
    assert saved == (24000 - 4096) * 2 * 3 * i
    assert round(saved / 2**30, 2) == 3.19
    # dropout on: d(silu(g)*u), down_proj's regenerated mask and (du A), + the gate/up input grads
    assert base.phases["backward"]["layer_backward"] - 24000 * 2 * h == 24000 * 2 * (3 * i + 2 * h)  # MLP-bound
    assert tiled.total_gb < base.total_gb - saved * 1.04 / 1e9
    # chunk >= seq_len changes nothing
    assert estimate(arch, seq_len=2048, mlp_chunk=4096).components == estimate(arch, seq_len=2048).components
    cfg = load_config(None, ["model.name_or_path=llama-3-70b", "data.seq_len=24000",
                             "performance.offload_activations=true", "performance.mlp_chunk_tokens=4096"])
    assert estimate_for_config(cfg).phases == tiled.phases


def test_negative_mlp_chunk_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"performance\.mlp_chunk_tokens: must be >= 0") as e:
        load_config(None, ["performance.mlp_chunk_tokens=-1"])
    assert "\n" not in str(e.value)


def test_memory_cli_mlp_chunk(capsys):
    import json

    from qlora_trainer.cli import main

    args = ["memory", "llama-3.1-70b", "--seq", "24000", "--budget", "48", "--offload", "--json"]
    main(args)
    plain = json.loads(capsys.readouterr().out)
    main([*args, "--mlp-chunk", "4096"])
    tiled = json.loads(capsys.readouterr().out)
    assert tiled["settings"]["mlp_chunk"] == 4096
    assert tiled["total_gb"] < plain["total_gb"] and tiled["max_seq_len"] > plain["max_seq_len"]
    assert main([*args, "--mlp-chunk", "-1"]) == 2
