"""A broken local model directory is one ``error:`` line naming the directory or file and the fix,
found before the data or the model load (exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (config.json + model.safetensors, no tokenizer)."""
    from qlora_trainer.models.tiny import random_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    random_model("tiny", seed=3).save_pretrained(path)
    return path


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _no_config(d):
    (d / "config.json").unlink()


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _pickle_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}))


BROKEN = {  # what is broken -> (damage, text the error must contain)
    "no config.json": (_no_config, "has no config.json, so it is not a Hugging Face model directory"),
    "unknown model_type": (lambda d: _edit_config(d, model_type="llamma"),
                           "config.json: model_type 'llamma' is unknown to transformers"),
    "not a causal LM": (lambda d: _edit_config(d, model_type="bert", architectures=["BertForMaskedLM"]),
                        "architectures ['BertForMaskedLM'] is not a causal (text-generating) language model"),
    "invalid config.json": (lambda d: (d / "config.json").write_text('{"model_type": "llama",\n'),
                            "config.json: line 2: invalid JSON"),
    "truncated safetensors": (_truncate, "model.safetensors: truncated ("),
    "pickle weights only": (_pickle_only, "only pickle weights (pytorch_model.bin); qlora_trainer loads "
                                          "safetensors only"),
    "missing shard": (_missing_shard, "model-00001-of-00002.safetensors: missing (listed in "
                                      "model.safetensors.index.json); download the model again"),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_model_directory_is_one_line_error_before_loading(cli_error, saved_tiny, tmp_path, monkeypatch,
                                                                 what):
    import qlora_trainer.train.recipe as load  # where train() looks the loader up

    damage, text = BROKEN[what]
    d = tmp_path / "m"
    shutil.copytree(saved_tiny, d)
    damage(d)
    monkeypatch.setattr(load, "load_tokenizer", lambda *_: pytest.fail("loaded before the check"))
    msg = cli_error("train", DEMO, f"model.name_or_path={d}", "model.tokenizer=random:tiny",
                    f"output_dir={tmp_path / 'out'}")
    assert text in msg and str(d) in msg


def test_model_directory_without_tokenizer_says_set_model_tokenizer(cli_error, saved_tiny, tmp_path):
    msg = cli_error("train", DEMO, f"model.name_or_path={saved_tiny}", f"output_dir={tmp_path / 'out'}")
    assert msg == (f"model.name_or_path: {saved_tiny} has no tokenizer files (tokenizer.json, tokenizer.model, "
                   f"...); set model.tokenizer to a tokenizer directory or hub id")


def test_model_directory_that_is_a_file(cli_error, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    msg = cli_error("train", DEMO, f"model.name_or_path={f}", "model.tokenizer=random:tiny",
                    f"output_dir={tmp_path / 'out'}")
    assert msg.startswith(f"model.name_or_path: '{f}' is a file; point it at the model directory")


def test_good_directory_passes_the_check(saved_tiny):
    from qlora_trainer.models.check import check_model_dir

    check_model_dir(saved_tiny)  # no error: the checks do not reject what save_pretrained writes
