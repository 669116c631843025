"""apply_checkpointing: same loss and gradients as no checkpointing (offload on and off), layers
really are recomputed, only the layer input (B, T, H) is saved, names are unchanged.

Tolerance: fp32 tiny model, recompute is the same arithmetic -> loss and grads atol 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qlora_trainer.models.checkpointing import CheckpointedLayer, CpuOffloader, apply_checkpointing


def _batch(b: int = 2, t: int = 9):
    ids = torch.randint(0, 256, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _loss_and_grads(model, batch):
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # use_cache from config
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got: tuple, want: tuple) -> None:
    """(loss, grads) of the checkpointed model equal the plain model's: loss atol 1e-6, grads
    rtol 1e-5 / atol 1e-6, over the same (non-empty) set of parameters."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-6)
    assert set(got_grads) == set(want_grads) and want_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_same_loss_and_grads_as_without_checkpointing(request, offload, nf4):
    model = request.getfixturevalue("tiny_nf4_model" if nf4 else "tiny_model").train()
    batch = _batch()
    want = _loss_and_grads(model, batch)
    ckpt = apply_checkpointing(copy.deepcopy(model), offload=offload)
    _assert_same(_loss_and_grads(ckpt, batch), want)


def test_layers_are_recomputed_in_backward_only_when_training(tiny_model):
    model = apply_checkpointing(tiny_model.train())
    calls = []
    # a pre-hook: the recompute stops early, right after the last tensor the backward needs
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    _loss_and_grads(model, _batch())
    assert len(calls) == 2  # forward + recompute
    calls.clear()
    with torch.no_grad():
        model(input_ids=_batch()[0])
    model.eval()
    model(input_ids=_batch()[0]).logits.sum().backward()
    assert len(calls) == 2  # no recompute under no_grad or in eval mode


class _Recorder(CpuOffloader):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def _pack(self, t):  # the shapes of the tensors the offloader counts
        packed = self.packed
        out = super()._pack(t)
        if self.packed > packed:
            self.shapes.append(tuple(t.shape))
        return out


def test_only_the_layer_input_is_saved(tiny_model):
    """The offload hooks see exactly one (B, T, H) tensor per layer: B·T·H·2 bytes in bf16."""
    model = apply_checkpointing(tiny_model.train())
    rec = _Recorder()
    for layer in model.model.layers:
        object.__setattr__(layer, "offloader", rec)
    _loss_and_grads(model, _batch(b=2, t=9))
    assert rec.shapes == [(2, 9, 128)] * 4 and rec.packed == 4
    assert rec.offloaded_bytes == 0  # CPU tensors stay put: offload is a no-op off CUDA


def test_names_parameters_and_attributes_unchanged(tiny_model):
    keys = list(tiny_model.state_dict())
    params = dict(tiny_model.named_parameters())
    model = apply_checkpointing(tiny_model, offload=True)
    layer = model.model.layers[0]
    assert isinstance(layer, CheckpointedLayer)
    assert list(model.state_dict()) == keys
    assert all(params[n] is p for n, p in model.named_parameters()) and len(params) == len(keys)
    assert layer.hidden_size == 128  # attribute read through to the wrapped layer
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # round trip with the same keys
    apply_checkpointing(model)
    assert not isinstance(layer._layer, CheckpointedLayer)  # not wrapped twice


def test_transformers_checkpointing_is_switched_off(tiny_model):
    # transformers >= 5.18 names it activation_checkpointing_enable; 5.17 only gradient_checkpointing_enable
    enable = getattr(tiny_model, "activation_checkpointing_enable", None) or tiny_model.gradient_checkpointing_enable
    enable()
    model = apply_checkpointing(tiny_model)
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert model.model.layers[0]._layer.gradient_checkpointing is False


def test_model_without_layers_is_an_error():
    with pytest.raises(ValueError, match="no decoder `layers`"):
        apply_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.gpu
def test_offload_moves_layer_inputs_to_cpu_on_cuda(tiny_model):
    model = tiny_model.cuda().train()
    batch = tuple(t.cuda() for t in _batch(b=2, t=33))
    want = _loss_and_grads(model, batch)
    ckpt = apply_checkpointing(copy.deepcopy(model), offload=True)
    _assert_same(_loss_and_grads(ckpt, batch), want)
    assert ckpt.model.layers[0].offloader.offloaded_bytes == 4 * 2 * 33 * 128 * 4  # fp32 here


def test_modules_replaced_after_wrapping_reach_the_wrapped_layer(tiny_model):
    """Order-independent with module replacement (adapt_model, inject_lora): the registries are
    shared, so a child swapped through the wrapper is the one the wrapped layer runs."""
    from qlora_trainer.kernels.swiglu import SwiGLUMLP
    from qlora_trainer.models.adapt import adapt_model

    model = adapt_model(apply_checkpointing(tiny_model), "torch")
    assert isinstance(model.model.layers[2]._layer.mlp, SwiGLUMLP)
    assert "model.layers.2.mlp.gate_proj.weight" in model.state_dict()
