"""``qlora-trainer combine``: writes the adapter ``combine_adapters`` computes (bit-exact), copies the
first adapter's config.yaml, explains rank-rule violations (exit 2), refuses to overwrite, and with
``--merge-into`` writes a dense model whose logits equal base + combined adapter (fp32, atol 1e-4).
The base is the 16-bit ``random:tiny`` (``model.quantization: none``), so this does not depend on the
NF4 CPU path."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.commands.combine import write_combined
from qlora_trainer.config import Config, LoRAConfig
from qlora_trainer.lora import disable_adapters, inject_lora, load_adapter, lora_layers, save_adapter
from qlora_trainer.lora.combine import combine_adapters
from qlora_trainer.lora.peft_format import read_adapter
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.tiny import byte_tokenizer


def _cfg(r: int) -> Config:
    cfg = Config()
    cfg.model.name_or_path = "random:tiny"
    cfg.model.quantization = "none"
    cfg.train.device = "cpu"
    cfg.lora = LoRAConfig(r=r, alpha=2 * r, dropout=0.0)
    return cfg


def _base():
    return load_base_model(_cfg(4), device=torch.device("cpu"), dtype=torch.float32, vocab_size=260).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine_cli")
    out = {}
    for name, r, seed in [("facts", 4, 1), ("style", 4, 2), ("wide", 8, 3)]:
        model, cfg = _base(), _cfg(r)
        inject_lora(model, cfg.lora, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.1)
        out[name] = save_adapter(model, root / name, cfg=cfg.lora, base_model="random:tiny",
                                 tokenizer=byte_tokenizer(), run_config=cfg)
    return out


def test_combine_cli_writes_the_library_result(dirs, tmp_path, capsys):
    out = tmp_path / "ties"
    args = ["combine", str(dirs["facts"]), str(dirs["style"]), "--method", "ties", "--density", "0.5",
            "--weights", "1", "0.5", "-o", str(out)]
    assert main(args) == 0
    assert "ties of" in capsys.readouterr().out
    want = combine_adapters([read_adapter(dirs["facts"]), read_adapter(dirs["style"])], [1.0, 0.5], "ties",
                            density=0.5)
    got = read_adapter(out)
    assert got.config["r"] == 4 and got.config["lora_alpha"] == 4 and (out / "config.yaml").is_file()
    for name, lw in want.layers.items():
        assert torch.equal(got.layers[name].a, lw.a) and torch.equal(got.layers[name].b, lw.b)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_combine_cli_explains_rank_rules(dirs, tmp_path, capsys):
    rc = main(["combine", str(dirs["facts"]), str(dirs["wide"]), "--method", "linear", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "ranks must be equal" in err and "--method cat (rank 12)" in err
    assert not (tmp_path / "x").exists()
    assert main(["combine", str(dirs["facts"]), str(dirs["wide"]), "--method", "cat", "-o", str(tmp_path / "c")]) == 0
    assert read_adapter(tmp_path / "c").config["r"] == 12


def test_combine_cli_merge_into(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["combine", str(dirs["facts"]), str(dirs["wide"]), "--method", "svd", "--svd-rank", "6",
                 "--weights", "0.7", "0.3", "--merge-into", "random:tiny", "-o", str(out)]) == 0
    model = _base()
    combined = combine_adapters([read_adapter(dirs["facts"]), read_adapter(dirs["wide"])], [0.7, 0.3], "svd",
                                svd_rank=6)
    load_adapter(model, write_combined(combined, tmp_path / "adapter", []), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = byte_tokenizer()("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        with disable_adapters(model):
            base = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert (expected - base).abs().max() > 1e-3
