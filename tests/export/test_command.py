"""``qlora-trainer export`` end to end from a saved adapter on an NF4 ``random:tiny`` base: the GGUF
(read back by transformers' GGUF loader) gives the adapter model's logits, the GGUF adapter, the
Ollama directory and the vLLM directories load, and what cannot be exported is one line, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.cli import main
from qlora_trainer.config import Config
from qlora_trainer.models.load import load_base_model

from .conftest import PROMPTS, add_lora, bpe_tokenizer


def _cfg() -> Config:
    cfg = Config()
    cfg.model.name_or_path = "random:tiny"
    cfg.train.device = "cpu"
    cfg.data.chat_template = "chatml"
    return cfg


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(adapter dir, its model's logits per prompt, tokenizer); a DoRA adapter beside it."""
    from qlora_trainer.lora import save_adapter

    root = tmp_path_factory.mktemp("export")
    tok = bpe_tokenizer("qwen2")
    out = {}
    for variant in ("lora", "dora"):
        cfg = _cfg()
        model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=len(tok)).eval()
        cfg.lora = add_lora(model, variant)
        save_adapter(model, root / variant, cfg=cfg.lora, base_model="random:tiny", tokenizer=tok, run_config=cfg)
        with torch.no_grad():
            out[variant] = [model(tok(t, return_tensors="pt")["input_ids"]).logits for t in PROMPTS]
    return root, out, tok


def _logits(model, tok):
    with torch.no_grad():
        return [model(tok(t, return_tensors="pt")["input_ids"]).logits for t in PROMPTS]


def test_gguf_gives_the_adapter_models_logits(adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root, ref, tok = adapter
    out = tmp_path / "tiny-f32.gguf"
    assert main(["export", str(root / "lora"), "--to", "gguf", "-o", str(out), "--outtype", "f32"]) == 0
    assert "llama-quantize" in capsys.readouterr().out
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    for want, got in zip(ref["lora"], _logits(back, tok)):
        assert (want - got).abs().max().item() < 1e-4


def test_gguf_adapter_ollama_and_vllm(adapter, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_trainer.lora.peft_format import read_adapter

    root, ref, tok = adapter
    assert main(["export", str(root / "lora"), "--to", "gguf-adapter", "-o", str(tmp_path / "a.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["adapter.type"].contents() == "lora" and len(reader.tensors) == 2 * 7 * 4

    assert main(["export", str(root / "lora"), "--to", "ollama", "-o", str(tmp_path / "ollama")]) == 0
    files = sorted(p.name for p in (tmp_path / "ollama").iterdir())
    assert files == [".qlora-trainer-output", "Modelfile", "model-f16.gguf"]  # the marker: --overwrite may replace it
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text and "PARAMETER num_ctx" in text
    chat = gguf.GGUFReader(tmp_path / "ollama" / "model-f16.gguf").fields["tokenizer.chat_template"].contents()
    assert chat.startswith("{% for message in messages %}") and "{% generation %}" not in chat

    assert main(["export", str(root / "lora"), "--to", "vllm", "-o", str(tmp_path / "vllm"),
                 "--dtype", "float32"]) == 0
    merged = tmp_path / "vllm" / "merged"
    gen = json.loads((merged / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert "quantization_config" not in model.config.to_dict()
    for want, got in zip(ref["lora"], _logits(model, tok)):
        assert (want - got).abs().max().item() < 1e-4
    served = AutoTokenizer.from_pretrained(str(merged))
    rendered = served.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    lora = tmp_path / "vllm" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert "modules_to_save" not in config and config["peft_type"] == "LORA"
    assert set(read_adapter(lora).layers) == set(read_adapter(root / "lora").layers)


def test_refusals_are_one_line_and_write_nothing(adapter, tmp_path, capsys):
    root, _, _ = adapter
    cases = [
        (["export", str(root / "dora"), "--to", "gguf-adapter", "-o", str(tmp_path / "d.gguf")], "DoRA"),
        (["export", str(root / "lora"), "--to", "gguf", "-o", str(root / "lora" / "x.gguf")], "lies inside the input"),
        (["export", str(root / "lora"), "--to", "gguf", "-o", str(tmp_path / "m.gguf"), "--outtype", "q4_k_m"],
         "llama-quantize"),
        (["export", str(root / "lora"), "--to", "ollama", "-o", str(tmp_path / "o"), "--chat-template",
          "{{ messages }}"], "not one of ours"),
        (["export", str(tmp_path), "--to", "gguf", "-o", str(root / "m.gguf")], "neither an adapter"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [] and not (root / "lora" / "x.gguf").exists()
    (tmp_path / "exists.gguf").write_text("mine")
    assert main(["export", str(root / "lora"), "--to", "gguf", "-o", str(tmp_path / "exists.gguf")]) == 2
    assert (tmp_path / "exists.gguf").read_text() == "mine"


def test_merged_directory_exports_too(adapter, tmp_path):
    """``merge``'s output is an input as well: its GGUF gives the adapter model's logits."""
    from transformers import AutoModelForCausalLM

    root, ref, tok = adapter
    assert main(["merge", str(root / "lora"), "-o", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = tmp_path / "gguf" / "m.gguf"
    assert main(["export", str(tmp_path / "merged"), "--to", "gguf", "-o", str(out), "--outtype", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    for want, got in zip(ref["lora"], _logits(back, tok)):
        assert (want - got).abs().max().item() < 1e-4


def test_dora_adapter_exports_merged(adapter, tmp_path):
    """A DoRA adapter, refused as a GGUF adapter, exports as the merged model with its logits."""
    from transformers import AutoModelForCausalLM

    root, ref, tok = adapter
    out = tmp_path / "dora.gguf"
    assert main(["export", str(root / "dora"), "--to", "gguf", "-o", str(out), "--outtype", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    for want, got in zip(ref["dora"], _logits(back, tok)):
        assert (want - got).abs().max().item() < 1e-4


def test_vllm_adapter_refusals(adapter, tmp_path):
    """What vLLM's LoRA loader would reject or silently mis-scale is refused, one line each."""
    import shutil

    from qlora_trainer.errors import QloraError
    from qlora_trainer.export.vllm import write_vllm_adapter

    root, _, _ = adapter
    with pytest.raises(QloraError, match="DoRA"):
        write_vllm_adapter(root / "dora", tmp_path / "d")
    for key, value, message in [("alpha_pattern", {"q_proj": 32}, "ignores"), ("bias", "all", "without biases"),
                                ("modules_to_save", ["lm_head"], "modules_to_save")]:
        src = tmp_path / f"src-{key}"
        shutil.copytree(root / "lora", src)
        config = json.loads((src / "adapter_config.json").read_text())
        config[key] = value
        (src / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(QloraError, match=message):
            write_vllm_adapter(src, tmp_path / f"out-{key}")
        assert not (tmp_path / f"out-{key}").exists()


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    """A user's file or directory is never replaced by ``--overwrite``; an earlier export is."""
    from qlora_trainer.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    mine = tmp_path / "notes.gguf"
    mine.write_text("my notes, not a GGUF file")
    assert main(["export", str(src), "--to", "gguf", "-o", str(mine), "--overwrite"]) == 2
    assert mine.read_text() == "my notes, not a GGUF file"
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["export", str(src), "--to", "vllm", "-o", str(folder), "--overwrite"]) == 2
    assert (folder / "keep.txt").read_text() == "mine"
    inside = src / "out.gguf"
    assert main(["export", str(src), "--to", "gguf", "-o", str(inside)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: --output:") for line in err), err


def test_gguf_file_is_replaced_only_with_overwrite_and_never_half_written(adapter, tmp_path, cli_error,
                                                                          monkeypatch):
    """An existing ``.gguf`` needs ``--overwrite`` (one line, untouched otherwise); a write that fails
    half-way leaves the earlier file as it was and no temporary beside it."""
    import errno

    import gguf

    root, _, _ = adapter
    out = tmp_path / "a.gguf"
    out.write_bytes(b"GGUF earlier export")
    argv = ["export", root / "lora", "--to", "gguf-adapter", "-o", out]
    assert cli_error(*argv) == f"--output: {out} already exists; pass --overwrite to replace it, or choose another path"
    assert out.read_bytes() == b"GGUF earlier export"

    def dies(writer):
        writer.fout[0].write(b"\0" * 100)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", dies)
        assert cli_error(*argv, "--overwrite").startswith(f"no space left on device writing {out};")
    assert out.read_bytes() == b"GGUF earlier export" and [p.name for p in tmp_path.iterdir()] == ["a.gguf"]
    assert main([str(a) for a in argv] + ["--overwrite"]) == 0
    assert out.stat().st_size > 1000 and gguf.GGUFReader(out).tensors
