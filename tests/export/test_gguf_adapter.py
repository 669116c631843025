"""GGUF LoRA adapter, read back: llama.cpp's keys, every A and B (q/k B rows permuted for Llama,
per-layer scales folded into B where one alpha cannot express them), and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.export.gguf_adapter import write_adapter_gguf
from qlora_trainer.lora.peft_format import read_adapter

from .conftest import add_lora, save_lora, tiny_model
from .test_gguf_model import LAYER_NAMES, fields


def _permuted(b: torch.Tensor, heads: int) -> torch.Tensor:
    d = b.shape[0] // heads
    return b[torch.arange(b.shape[0]).reshape(heads, 2, d // 2).transpose(1, 2).reshape(-1)]


@pytest.mark.parametrize("family,variant", [("llama", "lora"), ("llama", "rslora"), ("qwen2", "lora")])
def test_every_tensor_and_key(family, variant, tmp_path):
    import gguf

    model = tiny_model(family, 300)
    cfg = add_lora(model, variant)
    weights = read_adapter(save_lora(model, cfg, tmp_path / "adapter"))
    path = write_adapter_gguf(weights, model.config, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(path)
    kv = fields(reader)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
    alpha = kv["adapter.lora.alpha"]
    scale = cfg.alpha / (cfg.r ** 0.5 if variant == "rslora" else cfg.r)
    assert alpha == pytest.approx(scale * cfg.r)  # llama.cpp applies alpha / r
    got = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert len(got) == 2 * len(weights.layers) == 2 * 7 * 2
    c = model.config
    for name, lw in weights.layers.items():
        _, _, i, module = name.split(".", 3)
        key = f"blk.{i}.{LAYER_NAMES[module]}.weight"
        b = lw.b.float()
        heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(module)
        if heads and family != "qwen2":
            b = _permuted(b, heads)
        np.testing.assert_array_equal(got[f"{key}.lora_a"], lw.a.float().numpy())
        np.testing.assert_array_equal(got[f"{key}.lora_b"], b.numpy())


def test_layers_with_other_scales_fold_into_b(tmp_path):
    import gguf

    model = tiny_model("llama", 300)
    weights = read_adapter(save_lora(model, add_lora(model), tmp_path / "adapter"))
    name = "model.layers.1.mlp.down_proj"
    weights.layers[name].scale *= 3  # as an alpha_pattern entry would make it
    reader = gguf.GGUFReader(write_adapter_gguf(weights, model.config, tmp_path / "a.gguf"))
    b = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight.lora_b")
    np.testing.assert_allclose(np.asarray(b.data).reshape(weights.layers[name].b.shape),
                               3 * weights.layers[name].b.numpy(), rtol=1e-6)


def test_refusals(tmp_path):
    model = tiny_model("llama", 300)
    dora = read_adapter(save_lora(model, add_lora(model, "dora"), tmp_path / "dora"))
    with pytest.raises(QloraError, match="DoRA"):
        write_adapter_gguf(dora, model.config, tmp_path / "d.gguf")
    model = tiny_model("llama", 300)
    plain = read_adapter(save_lora(model, add_lora(model), tmp_path / "plain"))
    plain.token_rows = {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(1)}
    with pytest.raises(QloraError, match="embedding rows"):
        write_adapter_gguf(plain, model.config, tmp_path / "t.gguf")
    tied = tiny_model("qwen2", 300, tied=True)
    plain.token_rows = {}
    plain.layers["lm_head"] = plain.layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(QloraError, match="tied"):
        write_adapter_gguf(plain, tied.config, tmp_path / "h.gguf")
    assert not list(tmp_path.glob("*.gguf"))
