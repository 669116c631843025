"""Typed run configuration: dataclasses with documented fields, YAML + ``section.key=value`` overrides.

A config file is YAML with the sections below (each optional) plus the top-level keys
``output_dir`` and ``resume``::
    model:        {name_or_path: random:tiny, quantization: nf4}
    quantization: {double_quant: true, quant_storage: uint8}
    lora:         {r: 16, alpha: 32, dropout: 0.05, targets: all-linear}
    data:         {path: ..., format: instruction, seq_len: 512}
    train:        {max_steps: 100, lr: 2.0e-4, batch_size: 1, grad_accum: 16}
    output:       {log_every: 1, keep_last: 2}
    output_dir:   outputs/run

Every field's comment is its documentation (``qlora-trainer train --help-config`` prints them).
Unknown keys and bad values raise :class:`ConfigError` with a one-line message that names the key
(and the file) and, for a misspelling, the nearest valid name. Each section validates itself
(:meth:`Section.validate`): its fields against the allowed values it lists next to them (``RULES``,
rules from :mod:`qlora_trainer.config_rules`, also shown by ``--help-config``) and the rules between its
own fields; :meth:`Config.validate` adds the rules across sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qlora_trainer.errors import ConfigError
from qlora_trainer.config_rules import NONEMPTY, coerce, describe
from qlora_trainer.config_sections import (TRACKERS, AdaLoRAConfig, DataConfig, EvalConfig, GRPOConfig, LoRAConfig,
                                           ModelConfig, OutputConfig, PerformanceConfig, PreferenceConfig,
                                           QuantizationConfig, Section, TrainConfig)
from qlora_trainer.io import atomic_write_text
from qlora_trainer.io import read_text

__all__ = ["TRACKERS", "AdaLoRAConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "GRPOConfig", "LoRAConfig",
           "ModelConfig", "OutputConfig", "PerformanceConfig", "PreferenceConfig", "QuantizationConfig", "Section",
           "TrainConfig", "apply_override", "config_from_dict", "field_docs", "load_config", "rules", "save_config",
           "valid_keys", "MOVED", "UNADVERTISED"]

# --------------------------------------------------------------------------------------------------
# the whole config (its sections: config_sections.py)


@dataclass
class Config(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    output_dir: str = "outputs/run"
    """Where the adapter, metrics.jsonl and checkpoints go."""
    resume: str | None = None
    """``auto`` (newest complete checkpoint in ``output_dir``), a checkpoint path, or unset to start fresh."""
    resume_allow_changes: bool = False
    """Resume even though the config or the training data differ from the checkpoint's (the run then
    continues at a data position that may not mean what it did); by default such a resume is refused."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "output_dir": NONEMPTY,
        "resume": NONEMPTY,
    }

    def validate(self, prefix: str = "") -> "Config":
        """Validate every section (its fields' rules and its own checks), then the rules across sections;
        raise a one-line ConfigError naming the key."""
        super().validate(prefix)
        if self.data.marker_tokens == "add" and not self.model.resize_embeddings:
            raise ConfigError("data.marker_tokens: 'add' grows the vocabulary; also set model.resize_embeddings=true")
        if self.lora.init == "loftq" and self.model.quantization != "nf4":
            raise ConfigError("lora.init: loftq corrects the 4-bit quantization error; it needs model.quantization=nf4")
        if self.train.epochs is not None and self.train.max_steps is not None:
            raise ConfigError(f"train.epochs: {self.train.epochs:g} and train.max_steps {self.train.max_steps} both "
                              f"size the run; set one of them (train.max_steps=null to count in epochs)")
        if self.train.epochs is None and self.train.max_steps is None:
            self.train.max_steps = 100
        self._check_objective()
        lc = self.lora
        ada = lc.adalora
        if lc.variant == "adalora" and self.train.max_steps is not None and \
                ada.tinit >= self.train.max_steps - ada.tfinal:
            raise ConfigError(f"lora.adalora.tinit: {ada.tinit} + lora.adalora.tfinal {ada.tfinal} leave no "
                              f"budget phase in train.max_steps {self.train.max_steps}; lower them")
        if self.performance.compile != "none" and (self.lora.variant not in ("lora", "rslora") or
                                                   self.train.distributed != "none"):
            raise ConfigError(f"performance.compile: {self.performance.compile} supports lora/rslora adapters in "
                              f"one process (lora.variant={self.lora.variant}, "
                              f"train.distributed={self.train.distributed}); "
                              "set performance.compile=none")
        if self.train.distributed == "fsdp":
            if self.model.quantization == "nf4" and self.quantization.quant_storage == "uint8":
                raise ConfigError("quantization.quant_storage: FSDP shards floating-point tensors only; set it to "
                                  "the compute dtype (bfloat16 on CUDA, float32 on the CPU) with train.distributed=fsdp")
            for bad, key in ((self.performance.embeddings_on_cpu, "performance.embeddings_on_cpu"),
                             (self.lora.variant == "dora", "lora.variant=dora"),
                             (bool(self.eval.tasks), "eval.tasks")):  # generation needs whole weights
                if bad:
                    raise ConfigError(f"{key}: not supported with train.distributed=fsdp; use ddp or turn it off")
        return self

    def _check_objective(self) -> None:
        """train.objective against data.format (the objective decides what a batch holds)."""
        need = {"sft": None, "kto": "unpaired", "grpo": "prompt_only"}.get(self.train.objective, "preference")
        fmt = self.data.format
        if need is None and fmt in ("preference", "unpaired", "prompt_only"):
            raise ConfigError(f"data.format: {fmt} data trains with a preference objective; set train.objective "
                              "(dpo, ipo, orpo or simpo for preference pairs, kto for unpaired)")
        if need is not None and fmt != need:
            raise ConfigError(f"train.objective: {self.train.objective} needs data.format={need} "
                              f"(got {fmt})")
        if need is not None and self.data.pack:
            raise ConfigError(f"data.pack: not supported with train.objective={self.train.objective}; set it false")
        g = self.grpo
        if self.train.objective == "grpo" and not g.rewards:
            raise ConfigError("grpo.rewards: train.objective=grpo needs at least one reward function "
                              "(gsm8k_exact, gsm8k_format, module:function or file.py:function)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                fix: str = "fix it", ours: bool = False) -> Config:
    """Read a YAML file (or start from defaults), apply ``section.key=value`` overrides, validate.
    ``fix``: what to do about a damaged file; ``ours``: a config.yaml we wrote (always whole lines, so
    a cut-short one is recognised).

    Raises:
        ConfigError: one line naming the file, the key and the fix.
    """
    import yaml
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")

        text = read_text(p, fix, ConfigError, whole_lines=ours)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    cfg = config_from_dict(raw, where=where)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a nested dict (YAML shape), checking every key and type."""
    cfg = Config()
    _set_all(cfg, cfg, "", raw, where)
    return cfg


def _set_all(cfg: Config, obj: Any, prefix: str, raw: dict[str, Any], where: str) -> None:
    """Set every key of ``raw`` on ``obj`` (the section of ``cfg`` at ``prefix``), nested sections in turn."""
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if _is_section(type(obj), key):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name}: must be a mapping of keys, got {value!r}")
            _set_all(cfg, getattr(obj, key), f"{name}.", value, where)
        else:
            _set(cfg, name, value, where)


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` command-line override (value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    _set(cfg, key.strip(), value, "command line")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML, atomically."""
    import yaml

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_docs() -> dict[str, str]:
    """``section.key`` -> documentation string, read from the field docstrings (here and in config_sections.py)."""
    import ast
    import inspect
    import sys
    docs: dict[str, str] = {}
    sections = {cls.__name__: (prefix, cls) for prefix, cls in _sections(Config)}
    classes = {c.name: c for mod in {cls.__module__ for _, cls in sections.values()}
               for c in ast.parse(inspect.getsource(sys.modules[mod])).body if isinstance(c, ast.ClassDef)}
    for cname, node in classes.items():
        if cname not in sections:
            continue
        prefix, cls = sections[cname]
        body = node.body
        for i, stmt in enumerate(body[:-1]):
            nxt = body[i + 1]
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                key = prefix + stmt.target.id
                rule = describe(cls.RULES.get(stmt.target.id))  # the enforced range
                docs[key] = " ".join(str(nxt.value.value).split() + ([rule] if rule else []))
    return {k: docs[k] for k in valid_keys() if k in docs}  # in field order, nested sections in place


# --------------------------------------------------------------------------------------------------
# helpers


def _is_section(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    return f is not None and dataclasses.is_dataclass(_hints(cls)[name])


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(key prefix, class) of ``cls`` and every section nested in it, depth first (``Config`` is "")."""
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if _is_section(cls, f.name):
            out += _sections(_hints(cls)[f.name], f"{prefix}{f.name}.")
    return out


def valid_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every settable key (``section.key``, ``section.sub.key`` for a nested section), in field order."""
    cls = cls or Config
    keys = []
    for f in dataclasses.fields(cls):
        if _is_section(cls, f.name):
            keys += valid_keys(_hints(cls)[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def rules() -> dict[str, Any]:
    """``section.key`` -> the rule its value obeys (from each section's ``RULES``), for every ruled key."""
    return {prefix + name: rule for prefix, cls in _sections(Config) for name, rule in cls.RULES.items()}


# built but not measured on a GPU yet: settable, left out of --help-config until the GPU suite has measured them
UNADVERTISED = ("performance.nf4_matmul", "performance.compile")

# keys that moved to another section: old key -> its place now (a one-line error names it)
MOVED = {f"model.{k}": f"performance.{k}" for k in (
    "gradient_checkpointing", "offload_activations", "mlp_chunk_tokens", "embeddings_on_cpu", "kernels",
    "group_projections", "checkpoint_layers", "fused_add_norm", "nf4_matmul")} | {
    "train.compile": "performance.compile", "train.loss_chunk_size": "performance.loss_chunk_size"} | {
    f"train.eval_{k}": f"eval.{k}" for k in ("every", "batches", "tasks", "limit", "max_new_tokens")} | {
    f"lora.adalora_{k}": f"lora.adalora.{k}" for k in (
        "target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight")}


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    if key in MOVED:
        raise ConfigError(f"{where}: {key} is now {MOVED[key]}; rename it there")
    parts = key.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if not _is_section(type(obj), part):
            raise ConfigError(_unknown(key, where))
        obj = getattr(obj, part)
    name = parts[-1]
    if name not in {f.name for f in dataclasses.fields(obj)} or _is_section(type(obj), name):
        raise ConfigError(_unknown(key, where))
    setattr(obj, name, coerce(key, value, _hints(type(obj))[name], where))


def _unknown(key: str, where: str) -> str:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid_keys())}"
    return f"{where}: unknown key {key!r}{hint}"
