"""Check a local model directory before loading it: one line saying what is wrong and what to do.

Checked (cheaply: JSON and safetensors headers, file sizes; no tensor is read):
``config.json`` present and valid, a ``model_type`` transformers knows, a causal-LM architecture,
safetensors weights present (a pickle-only ``pytorch_model.bin`` is refused: safetensors only) and
not truncated (each file's size equals header + the end of its last tensor), every shard of an
index present, and tokenizer files where the tokenizer is read from the same directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora_trainer.errors import QloraError
from qlora_trainer.io import read_json_object
from qlora_trainer.runtime import expand_path
from qlora_trainer.io import check_safetensors as check

if TYPE_CHECKING:
    from qlora_trainer.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
RANDOM_PREFIX = "random:"


def is_random(name: str) -> bool:
    """``random:<arch>``: a random model of a catalog shape, built in-process."""
    return name.startswith(RANDOM_PREFIX)


def check_source(name: str, what: str) -> None:
    """A path-looking name must exist; a hub id needs the network unless it is cached."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise QloraError(f"model.{what}: {name!r} does not exist (a local directory or a hub id "
                         f"like meta-llama/Llama-2-7b-hf)")


def check_model_source(m: "ModelConfig") -> None:
    """Check ``model.name_or_path`` (and a separate local ``model.tokenizer``) when they are local."""
    tokenizer = m.tokenizer or m.name_or_path
    if not m.name_or_path.startswith(RANDOM_PREFIX):
        name = expand_path(m.name_or_path)
        check_source(name, "name_or_path")
        if Path(name).exists():
            check_model_dir(Path(name), trust_remote_code=m.trust_remote_code)
    if not tokenizer.startswith(RANDOM_PREFIX):
        name = expand_path(tokenizer)
        check_source(name, "tokenizer" if m.tokenizer else "name_or_path")
        if Path(name).is_dir():
            check_tokenizer_dir(Path(name), key="model.tokenizer" if m.tokenizer else "model.name_or_path")


def check_model_dir(p: Path, *, trust_remote_code: bool = False) -> None:
    """Raise QloraError naming ``p`` and the fix if it is not a loadable causal-LM directory."""
    key = "model.name_or_path"
    if not p.is_dir():
        raise QloraError(f"{key}: {str(p)!r} is a file; point it at the model directory (the one with config.json)")
    if not (p / "config.json").is_file():
        raise QloraError(f"{key}: {p} has no config.json, so it is not a Hugging Face model directory; "
                         f"point model.name_or_path at the directory holding config.json and *.safetensors")
    cfg = read_json_object(p / "config.json")
    model_type = cfg.get("model_type")
    if not model_type:
        raise QloraError(f"{p / 'config.json'}: no model_type; this is not a transformers model config")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES and not (trust_remote_code and "auto_map" in cfg):
        import transformers

        raise QloraError(f"{p / 'config.json'}: model_type {model_type!r} is unknown to transformers "
                         f"{transformers.__version__}; upgrade transformers, or check the directory")
    archs = cfg.get("architectures") or []
    if archs and not any(str(a).endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise QloraError(f"{p / 'config.json'}: architectures {archs} is not a causal (text-generating) language "
                         f"model; qlora_trainer fine-tunes *ForCausalLM models such as Llama or Mistral")
    _check_weights(p)


def _check_weights(p: Path) -> None:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        for name in shards:
            if not (p / name).is_file():
                raise QloraError(f"{p / name}: missing (listed in {index.name}); download the model again")
    else:
        shards = sorted(f.name for f in p.glob("*.safetensors"))
    if not shards:
        pickles = sorted(f.name for f in p.glob("*.bin"))
        if pickles:
            raise QloraError(f"{p}: only pickle weights ({pickles[0]}); qlora_trainer loads safetensors only "
                             f"(convert them, e.g. model.save_pretrained(dir, safe_serialization=True))")
        raise QloraError(f"{p}: no model weights (*.safetensors); download the model again")
    for name in shards:
        check_safetensors(p / name)


def check_safetensors(f: Path) -> None:
    """Raise QloraError if ``f`` is not a whole safetensors file (bad header or truncated data)."""

    check(f, fix="the download or copy was cut short: fetch it again")


def check_tokenizer_dir(p: Path, key: str = "model.tokenizer") -> None:
    """Raise QloraError if directory ``p`` holds no tokenizer files."""
    if not any((p / n).is_file() for n in TOKENIZER_FILES):
        raise QloraError(f"{key}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); set "
                         f"model.tokenizer to a tokenizer directory or hub id")
    check_tokenizer_files(p, fix="copy the tokenizer files again (or the whole model directory)")


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(p: Path, fix: str) -> None:
    """The JSON tokenizer files in ``p`` parse (a cut-short tokenizer.json is one line, not a
    tokenizers traceback)."""

    for name in TOKENIZER_JSON:
        if (p / name).is_file():
            read_json_object(p / name, fix=fix)
