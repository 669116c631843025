"""Mixture-of-experts checkpoints quantized while loading (models/moe_load.py, models/moe_checkpoint.py),
on tiny Mixtral and Qwen3-MoE: the expert-by-expert NF4 weight is bit-identical to quantizing the
whole fused tensor; a streamed load (per-expert hub layout, fused layout, sharded) equals the old
path (transformers + bitsandbytes, then ``quantize_experts``) tensor for tensor and in its logits;
tied embeddings; one-line errors for a missing tensor, a wrong shape and pickle-only weights.
The load's memory peak is measured in tests/benchmarks/test_moe_load_peak.py."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import config_from_dict
from qlora_trainer.errors import QloraError
from qlora_trainer.models.families import MOE, family_config
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.moe import EXPERT_PARAMS, NF4Experts, experts_modules
from qlora_trainer.models.moe_checkpoint import checkpoint_files
from qlora_trainer.models.moe_load import has_experts, nf4_expert_weight
from qlora_trainer.models.quantize import is_4bit
from qlora_trainer.models.tiny import model_from_config

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 5, 9, 200, 7, 3, 41, 90]])


def _save(family: str, path, **config):
    cfg = family_config(family)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = model_from_config(cfg, seed=0)
    model.save_pretrained(path)
    return model


def _load(path, *, streamed: bool = True, dtype: torch.dtype = torch.float32, **quant):
    cfg = config_from_dict({"model": {"name_or_path": str(path)}, "quantization": quant})
    return load_base_model(cfg, device=CPU, dtype=dtype, stream_experts=streamed)


def _nf4_fields(p) -> dict:
    qs = p.quant_state
    out = {"packed": p.data, "absmax": qs.absmax, "code": qs.code, "shape": qs.shape, "dtype": qs.dtype,
           "blocksize": qs.blocksize, "quant_type": qs.quant_type, "nested": qs.nested,
           "storage": p.data.dtype}
    if qs.nested:
        out |= {"offset": qs.offset, "absmax2": qs.state2.absmax, "code2": qs.state2.code,
                "blocksize2": qs.state2.blocksize}
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes: packed 4-bit codes in float storage hold NaN patterns, which never compare equal."""
    return t.detach().reshape(-1).view(torch.uint8)


def _assert_same_nf4(a, b) -> None:
    fa, fb = _nf4_fields(a), _nf4_fields(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert fa[k].dtype == fb[k].dtype and torch.equal(_bits(fa[k]), _bits(fb[k])), k
        else:
            assert fa[k] == fb[k], k


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16-storage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expert_by_expert_nf4_is_bit_identical_to_the_whole_tensor(double_quant, storage, dtype):
    experts = next(iter(experts_modules(model_from_config(family_config("mixtral"), seed=1)).values()))
    whole = NF4Experts.from_module(experts, compute_dtype=dtype, double_quant=double_quant, quant_storage=storage)
    for name in EXPERT_PARAMS:
        w = getattr(experts, name).detach()
        streamed = nf4_expert_weight(lambda e: w[e], w.shape[0], compute_dtype=dtype, double_quant=double_quant,
                                     quant_storage=storage)
        _assert_same_nf4(streamed, getattr(whole, name))


def _assert_same_model(new, old) -> None:
    assert [type(m).__name__ for m in new.modules()] == [type(m).__name__ for m in old.modules()]
    for (name, a), (_, b) in zip(new.named_modules(), old.named_modules()):
        if isinstance(a, NF4Experts) or is_4bit(a):
            for p in (EXPERT_PARAMS if isinstance(a, NF4Experts) else ("weight",)):
                _assert_same_nf4(getattr(a, p), getattr(b, p))
    sn, so = new.state_dict(), old.state_dict()
    assert sn.keys() == so.keys()
    for k in sn:
        assert sn[k].dtype == so[k].dtype and torch.equal(_bits(sn[k]), _bits(so[k])), k
    with torch.no_grad():
        torch.testing.assert_close(new(IDS).logits, old(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", MOE)
def test_streamed_load_equals_the_old_path(family, tmp_path):
    ref = _save(family, tmp_path / "m")
    keys = checkpoint_files(tmp_path / "m")
    if family == "granitemoe":  # save_pretrained writes its fused experts under their old names
        assert any(k.endswith(".input_linear.weight") for k in keys)
    else:  # per expert
        assert any(".experts.0." in k for k in keys)
    new, old = _load(tmp_path / "m"), _load(tmp_path / "m", streamed=False)
    experts = experts_modules(new)
    assert len(experts) == 2 and all(isinstance(m, NF4Experts) for m in experts.values())
    assert not any(p.is_meta for p in new.parameters()) and not new.training
    _assert_same_model(new, old)
    with torch.no_grad():
        assert (new(IDS).logits - ref(IDS).logits).abs().max() > 0  # really quantized


@pytest.mark.parametrize("cls, extra", [
    ("Qwen2MoeConfig", {"moe_intermediate_size": 48, "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1}),
    ("OlmoeConfig", {}),
], ids=["qwen2_moe", "olmoe"])
def test_other_moe_families_stream_too(cls, extra, tmp_path):
    import transformers

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2)
    config = getattr(transformers, cls)(**shape, **extra)
    model_from_config(config, seed=0).save_pretrained(tmp_path / "m")
    new = _load(tmp_path / "m")
    assert len(experts_modules(new)) == 2 and all(isinstance(m, NF4Experts) for m in experts_modules(new).values())
    _assert_same_model(new, _load(tmp_path / "m", streamed=False))


@pytest.mark.parametrize("family", MOE)
def test_fused_and_sharded_checkpoints_load_the_same(family, tmp_path):
    from safetensors.torch import save_file

    ref = _save(family, tmp_path / "hub")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in checkpoint_files(fused))
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    want = _load(tmp_path / "hub")
    _assert_same_model(_load(fused), want)
    _assert_same_model(_load(tmp_path / "sharded"), want)


@pytest.mark.parametrize("quant", [{"double_quant": False}, {"quant_storage": "bfloat16"}],
                         ids=["no-dq", "bf16-storage"])
def test_streamed_load_follows_the_quantization_settings(quant, tmp_path):
    _save("qwen3_moe", tmp_path / "m")
    _assert_same_model(_load(tmp_path / "m", **quant), _load(tmp_path / "m", streamed=False, **quant))


def test_blocksize_applies_to_every_4bit_weight(tmp_path):
    """transformers' BitsAndBytesConfig has no blocksize (the old path quantized linears at 64 whatever
    ``quantization.blocksize`` said); the streamed load honours it everywhere, as random models do."""
    _save("mixtral", tmp_path / "m")
    model = _load(tmp_path / "m", blocksize=128)
    states = [m.weight.quant_state for m in model.modules() if is_4bit(m)]
    states += [getattr(m, p).quant_state for m in experts_modules(model).values() for p in EXPERT_PARAMS]
    assert len(states) == 12 and {s.blocksize for s in states} == {128}


@pytest.mark.parametrize("family", MOE)
def test_bf16_load_equals_the_old_path(family, tmp_path):
    _save(family, tmp_path / "m")
    new = _load(tmp_path / "m", dtype=torch.bfloat16)
    assert new.model.embed_tokens.weight.dtype == torch.bfloat16
    _assert_same_model(new, _load(tmp_path / "m", dtype=torch.bfloat16, streamed=False))


def test_tied_embeddings_are_tied(tmp_path):
    _save("qwen3_moe", tmp_path / "m", tie_word_embeddings=True)
    assert "lm_head.weight" not in checkpoint_files(tmp_path / "m")
    model = _load(tmp_path / "m")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_model(model, _load(tmp_path / "m", streamed=False))


@pytest.mark.parametrize("family", MOE)
def test_streamed_model_trains_with_expert_lora(family, tmp_path):
    from qlora_trainer.config import Config
    from qlora_trainer.lora.experts import expert_lora_layers
    from qlora_trainer.train.setup import build_optimizer, prepare_model

    _save(family, tmp_path / "m")
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.train.lr = 2e-2
    model = prepare_model(_load(tmp_path / "m"), cfg, device=CPU, dtype=torch.float32)
    opt = build_optimizer(model, cfg)
    losses = []
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        grads = [p.grad for layer in expert_lora_layers(model).values() for d in layer.lora_B.values()
                 for p in d.values()]  # lora_B: lora_A has no gradient while B = 0
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_generation_config_and_name_as_from_pretrained(tmp_path):
    _save("mixtral", tmp_path / "m")
    new, old = _load(tmp_path / "m"), _load(tmp_path / "m", streamed=False)
    assert new.generation_config.to_dict() == old.generation_config.to_dict()
    assert new.config._name_or_path == old.config._name_or_path == str(tmp_path / "m")


def test_prequantized_checkpoint_keeps_the_transformers_path(tmp_path):
    from qlora_trainer.models.load import _streamed_moe

    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path)}})
    hf = family_config("mixtral")
    with pytest.raises(QloraError, match="no \\*.safetensors"):  # 16-bit config: the streamed path
        _streamed_moe(cfg, str(tmp_path), hf, impl="eager", device=CPU, dtype=torch.float32)
    hf.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert _streamed_moe(cfg, str(tmp_path), hf, impl="eager", device=CPU, dtype=torch.float32) is None


def test_dense_families_keep_the_transformers_path():
    assert has_experts(family_config("mixtral")) and has_experts(family_config("qwen3_moe"))
    assert not has_experts(family_config("llama")) and not has_experts(family_config("qwen3"))


def _rewrite(path, drop: str | None = None, reshape: str | None = None, add: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].contiguous()
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"))


def test_unused_checkpoint_tensor_is_logged_and_skipped(tmp_path, caplog):
    _save("mixtral", tmp_path / "m")
    _rewrite(tmp_path / "m", add="model.layers.0.self_attn.rotary_emb.inv_freq")
    with caplog.at_level("WARNING", logger="qlora_trainer.models.moe_load"):
        model = _load(tmp_path / "m")
    assert "model.layers.0.self_attn.rotary_emb.inv_freq is not used" in caplog.text
    _assert_same_model(model, _load(tmp_path / "m", streamed=False))


@pytest.mark.parametrize("key", ["model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight",
                                 "model.layers.0.self_attn.k_proj.weight"])
def test_missing_tensor_is_a_one_line_error_naming_it(key, tmp_path):
    _save("qwen3_moe", tmp_path / "m")
    _rewrite(tmp_path / "m", drop=key)
    with pytest.raises(QloraError) as e:
        _load(tmp_path / "m")
    msg = str(e.value)
    assert "\n" not in msg
    assert ("expert 3 (up) of model.layers.1.mlp.experts" if "experts" in key else repr(key)) in msg


@pytest.mark.parametrize("key", ["model.layers.0.mlp.experts.1.down_proj.weight", "model.embed_tokens.weight"])
def test_wrong_shape_is_a_one_line_error(key, tmp_path):
    _save("qwen3_moe", tmp_path / "m")
    _rewrite(tmp_path / "m", reshape=key)
    with pytest.raises(QloraError, match="expects") as e:
        _load(tmp_path / "m")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reader_copies_out_one_tensor_or_one_expert(dtype, tmp_path):
    """Each read owns exactly its bytes (no view of a file-sized buffer or map) and equals safetensors'."""
    from safetensors.torch import load_file, save_file

    from qlora_trainer.models.moe_checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"a.experts.gate_up_proj": torch.randn(4, 6, 8, generator=g).to(dtype),
               "b.weight": torch.randn(5, 3, generator=g).to(dtype), "c": torch.arange(7)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ref = load_file(str(tmp_path / "model.safetensors"))
    with Checkpoint(checkpoint_files(tmp_path)) as ckpt:
        reads = [(ckpt.tensor(k), ref[k]) for k in tensors]
        reads += [(ckpt.row("a.experts.gate_up_proj", e), ref["a.experts.gate_up_proj"][e]) for e in range(4)]
    for got, want in reads:
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.untyped_storage().nbytes() == want.numel() * want.element_size()


def test_pickle_only_checkpoint_is_refused_with_the_fix(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QloraError, match="only pickle weights.*safe_serialization") as e:
        checkpoint_files(tmp_path)
    assert "\n" not in str(e.value)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    with pytest.raises(QloraError, match="x.safetensors: missing"):
        checkpoint_files(tmp_path)
