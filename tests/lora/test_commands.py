"""``qlora-trainer generate`` with two adapters (each answer equals that adapter's own greedy output)
and ``qlora-trainer merge`` (no quantization_config; loads with AutoModelForCausalLM; logits match
the NF4 + adapter model within 1e-4 in fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.config import Config, LoRAConfig
from qlora_trainer.lora import inject_lora, lora_layers, save_adapter
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.tiny import byte_tokenizer

PROMPT = "Hello there"


def _cfg() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "random:tiny"
    cfg.train.device = "cpu"
    return cfg


def _base_model():
    """The NF4 random:tiny base exactly as the CLI rebuilds it from the saved config."""
    return load_base_model(_cfg(), device=torch.device("cpu"), dtype=torch.float32, vocab_size=260).eval()


def _add_adapter(model, name: str, variant: str, seed: int) -> LoRAConfig:
    cfg = LoRAConfig(r=4, alpha=8, variant=variant, dropout=0.0)
    torch.manual_seed(seed)  # A's init draws from the global generator: independent of test order
    inject_lora(model, cfg, dtype=torch.float32, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B[name]
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return cfg


def _greedy(model, tok, n: int) -> str:
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=259, eos_token_id=258,
                             use_cache=True)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tok = byte_tokenizer()
    out = {}
    model = _base_model()  # one base, two adapters (the fixture itself uses the switching API)
    for name, variant, seed in [("alpha", "lora", 1), ("beta", "dora", 3)]:
        cfg = _cfg()
        cfg.lora = _add_adapter(model, name, variant, seed)
        save_adapter(model, root / name, cfg=cfg.lora, base_model=cfg.model.name_or_path, tokenizer=tok,
                     run_config=cfg, adapter_name=name)
        with torch.no_grad():
            logits = model(tok(PROMPT, return_tensors="pt")["input_ids"]).logits
        out[name] = {"dir": root / name, "text": _greedy(model, tok, 4), "logits": logits}
    return out


def test_generate_compares_two_adapters(adapters, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    rc = main(["generate", "--adapter", str(adapters["alpha"]["dir"]), "--adapter", str(adapters["beta"]["dir"]),
               "--prompt", PROMPT, "--template", "raw", "--max-new-tokens", "4", "--with-base",
               "--output", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = {r["adapter"]: r["completion"] for r in records}
    assert set(got) == {"base", "alpha", "beta"}
    assert got["alpha"] == adapters["alpha"]["text"] and got["beta"] == adapters["beta"]["text"]
    assert got["alpha"] != got["beta"]
    printed = capsys.readouterr().out
    assert "--- alpha ---" in printed and "--- beta ---" in printed


def test_generate_errors(capsys, tmp_path):
    assert main(["generate", "--prompt", "x"]) == 2
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_merge_cli_writes_plain_16bit_model(adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(adapters["beta"]["dir"]), "-o", str(out)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "max |Δlogit|" in ln][0]
    assert float(line.rsplit(":", 1)[1]) < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    ids = byte_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapters["beta"]["logits"], atol=1e-4, rtol=1e-4)
    assert main(["merge", str(adapters["beta"]["dir"]), "-o", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_read_prompts_from_files(tmp_path):
    import argparse

    from qlora_trainer.commands.generate import read_prompts
    from qlora_trainer.errors import QloraError

    txt, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    txt.write_text("first\n\nsecond\n")
    jsonl.write_text('{"prompt": "third"}\n{"question": "x"}\n')
    assert read_prompts(argparse.Namespace(prompt=["zero"], prompts_file=str(txt))) == ["zero", "first", "second"]
    with pytest.raises(QloraError, match=r"p\.jsonl:2: expected a JSON object with a 'prompt' field"):
        read_prompts(argparse.Namespace(prompt=[], prompts_file=str(jsonl)))


def test_generate_output_replaces_only_its_own_records_and_never_half_writes(adapters, tmp_path, cli_error,
                                                                              monkeypatch):
    """``--output`` over an existing file needs ``--overwrite`` and replaces only an earlier records
    file (never a user's file, never the prompts being read); a failing write keeps the old file."""
    import errno

    import qlora_trainer.io

    out, prompts = tmp_path / "gen.jsonl", tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    argv = ["generate", "--adapter", adapters["alpha"]["dir"], "--prompts-file", prompts, "--template", "raw",
            "--max-new-tokens", "2", "--output"]
    assert cli_error(*argv, prompts, "--overwrite").startswith(f"--output: {prompts} is the input {prompts};")
    out.write_text("my own notes\n")
    assert cli_error(*argv, out) == f"--output: {out} already exists; pass --overwrite to replace it, or choose " \
                                    f"another path"
    assert cli_error(*argv, out, "--overwrite").startswith(f"--output: {out} is not a records file of generate")
    assert out.read_text() == "my own notes\n" and json.loads(prompts.read_text()) == {"prompt": PROMPT}

    earlier = json.dumps({"prompt": "old", "adapter": "base", "completion": "old"}) + "\n"
    out.write_text(earlier)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # the records are written, then the disk fills before they are synced
        m.setattr(qlora_trainer.io.os, "fsync", disk_full)
        assert cli_error(*argv, out, "--overwrite").startswith(f"no space left on device writing {out};")
    assert out.read_text() == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "prompts.jsonl"]
    assert main([str(a) for a in argv] + [str(out), "--overwrite"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"prompt": PROMPT, "adapter": "alpha", "completion": records[0]["completion"]}]
