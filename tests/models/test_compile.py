"""``performance.compile``: each decoder layer under torch.compile equals the eager step, and the LoRA dropout
seed is not frozen by a compiled graph.

On the CPU: torch.compile's ``aot_eager`` backend (dynamo + AOTAutograd, no code generation: the
graph capture that matters for a frozen seed, at test speed) over the torch references; the tiny
NF4 + LoRA model, every layer checkpointed, dropout 0.1; inductor itself (slow-marked). On CUDA
(gpu-marked): inductor with CUDA graphs (``reduce-overhead``) over the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch

SEQ = 32


def _model(kernels: str = "torch", device: str = "cpu", compile_mode: str | None = None,
           compile_backend: str | None = None, checkpointing: bool = True):
    from qlora_trainer.config import Config
    from qlora_trainer.models.catalog import CATALOG
    from qlora_trainer.models.compile import compile_layers
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.runtime import resolve_dtype
    from qlora_trainer.train import prepare_model

    dev = torch.device(device)
    dtype = resolve_dtype("auto", dev)
    cfg = Config()
    cfg.lora.r, cfg.lora.dropout = 8, 0.1
    cfg.data.seq_len, cfg.performance.kernels, cfg.performance.gradient_checkpointing = SEQ, kernels, checkpointing
    torch.manual_seed(0)
    model = prepare_model(synthetic_nf4_model(CATALOG["tiny"], device=dev, compute_dtype=dtype), cfg,
                          device=dev, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)  # lora_B starts at 0: make the dropout visible in every gradient
    if compile_mode:
        assert compile_layers(model, compile_mode, backend=compile_backend) == 4
    ids = torch.randint(0, CATALOG["tiny"].vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids.to(dev), "labels": ids.to(dev)}


def _steps(model, batch, kernels: str, n: int = 2) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``n`` forward + backward passes on the same batch and parameters, the RNG running on."""
    from qlora_trainer.train import causal_lm_loss

    torch.manual_seed(1)
    out = []
    for _ in range(n):
        loss, count = causal_lm_loss(model, batch, backend=kernels)
        (loss / count).backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out


def _assert_steps_equal(got, want, rtol: float, atol: float) -> None:
    for (loss_c, grads_c), (loss_e, grads_e) in zip(got, want):
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 4 * 7 * 2
        for k, g in grads_e.items():
            torch.testing.assert_close(grads_c[k], g, rtol=rtol, atol=atol, msg=k)


def test_compiled_step_equals_eager_and_dropout_seed_is_not_frozen():
    """Two passes over the same batch and parameters: compiled == eager pass by pass (loss and all 56
    LoRA gradients, through the checkpoint recompute); the two passes differ (a new dropout mask
    each, so the seed was not captured as a constant); dynamo traced each layer whole (no graph
    break: the LoRA Functions, their dropout and the NF4 dequantization are in the graph)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _steps(*_model(), "torch")
    compiled = _steps(*_model(compile_mode="default", compile_backend="aot_eager"), "torch")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    _assert_steps_equal(compiled, eager, rtol=1e-5, atol=1e-6)
    (loss1, grads1), (loss2, grads2) = compiled
    assert not torch.equal(loss1, loss2)
    name = next(k for k in grads1 if "q_proj.lora_A" in k)
    assert (grads1[name] - grads2[name]).abs().max() > 1e-3 * grads1[name].abs().max()


def test_compile_config_is_validated(cli_error, tmp_path):
    from qlora_trainer.config import Config
    from qlora_trainer.errors import ConfigError

    cfg = Config()
    cfg.performance.compile = "reduce-overhead"
    cfg.validate()
    cfg.lora.variant = "dora"
    with pytest.raises(ConfigError, match="^performance.compile: reduce-overhead supports lora/rslora"):
        cfg.validate()
    path = tmp_path / "c.yaml"
    path.write_text("performance: {compile: max-autotune}\n")
    msg = cli_error("train", path)
    assert "performance.compile" in msg and "reduce-overhead" in msg


@pytest.mark.slow
def test_inductor_recompute_redraws_the_forwards_masks():
    """Inductor (C++ on the CPU, ~100 s): it lowers ``randint`` to its own Philox stream, so its masks
    are not eager's, but they are seeded from the device generator that the checkpoint restores:
    every layer checkpointed == no checkpointing (loss and grads, two passes), and the passes differ."""
    torch._dynamo.reset()
    ckpt = _steps(*_model(compile_mode="default"), "torch")
    torch._dynamo.reset()
    plain = _steps(*_model(compile_mode="default", checkpointing=False), "torch")
    _assert_steps_equal(ckpt, plain, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ckpt[0][0], ckpt[1][0])


@pytest.mark.gpu
def test_reduce_overhead_on_cuda_equals_eager_and_redraws_dropout():
    """CUDA, Triton kernels, bf16: inductor + CUDA graphs (``reduce-overhead``) vs eager, three passes
    (the first records, the others replay), with ``fallback_random`` so that the compiled graph draws
    the seed with aten's ``randint`` as eager does: bf16 tolerance, and the passes differ (the seed is
    redrawn on every replay by the graph-safe CUDA generator)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    eager = _steps(*_model("triton", "cuda"), "triton", n=3)
    with inductor_config.patch(fallback_random=True):
        compiled = _steps(*_model("triton", "cuda", compile_mode="reduce-overhead"), "triton", n=3)
    _assert_steps_equal(compiled, eager, rtol=3e-2, atol=3e-3)
    assert not torch.equal(compiled[1][0], compiled[2][0])
