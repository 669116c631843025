"""A safetensors checkpoint read tensor by tensor (or one expert of a tensor), and where a
mixture-of-experts model's weights are in it.

:class:`Checkpoint` reads ``model.safetensors`` or the shards of ``model.safetensors.index.json``
one tensor, or one row of a tensor's first dimension (one expert of a fused weight), at a time:
a plain read of that tensor's bytes at its offset (the format is an 8-byte header length, a JSON
header ``key -> dtype, shape, data_offsets``, then the data), into a fresh CPU tensor. No memory
map: the host never holds (or maps) the whole 16-bit checkpoint, and every byte read is an
ordinary allocation that the profiler sees (``benchmarks/moe_load_peak.py``).

Key layouts of the experts of transformers-5 fused modules (``<block>.experts.gate_up_proj``
(E, 2I, H) = [gate; up] along dim 1, ``<block>.experts.down_proj`` (E, H, I)):

* per expert (hub checkpoints, and what transformers 5.17-5.24 ``save_pretrained`` writes back):
  ``<block>.experts.<e>.{gate_proj,up_proj,down_proj}.weight`` (Qwen2/3-MoE, OLMoE) or
  ``<block>.experts.<e>.{w1,w3,w2}.weight`` (Mixtral: gate = w1, up = w3, down = w2);
* fused: the model's own parameter names.

Mixtral's and PhiMoE's checkpoints name the sparse block ``block_sparse_moe`` where the model says
``mlp``, PhiMoE's router ``gate``, Granite-MoE's fused experts ``input_linear`` / ``output_linear``
(:data:`MODULE_RENAMES`). This small table is ours, checked on both transformers releases we
support, rather than transformers' internal conversion mapping.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlora_trainer.errors import QloraError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
# checkpoint name -> transformers-5 name, tried one by one and all together (PhiMoE needs two)
MODULE_RENAMES = (
    (".block_sparse_moe.", ".mlp."),  # Mixtral, PhiMoE
    (".mlp.gate.weight", ".mlp.router.weight"),  # PhiMoE's router
    (".input_linear.weight", ".experts.gate_up_proj"),  # Granite-MoE's fused experts (E, 2I, H)
    (".output_linear.weight", ".experts.down_proj"),  # (E, H, I)
    (".router.layer.weight", ".router.weight"),  # Granite-MoE's router
)
_EXPERT_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<weight>\w+)\.weight$")
EXPERT_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor key -> safetensors file of the model in ``directory``; a one-line QloraError when it has
    no safetensors weights (e.g. ``.bin`` only) or a listed shard is missing."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        out = {k: directory / f for k, f in weight_map.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise QloraError(f"{f}: missing (listed in {index.name}); download the model again")
        return out
    files = [directory / SAFETENSORS_FILE] if (directory / SAFETENSORS_FILE).is_file() else \
        sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(f.name for f in directory.glob("*.bin"))
        what = f"only pickle weights ({found[0]})" if found else "no *.safetensors weights"
        raise QloraError(f"{directory}: {what}; a mixture-of-experts model is quantized while loading from "
                         f"safetensors: convert it (model.save_pretrained(dir, safe_serialization=True)) "
                         f"or set model.quantization: none")
    out = {}
    for f in files:
        out.update(dict.fromkeys((k for k in read_header(f) if not k.startswith("__")), f))
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of safetensors file ``path``: key -> {dtype, shape, data_offsets}, plus
    ``__data_start__`` (the file offset of the data section). One-line QloraError when unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise QloraError(f"{path}: not a readable safetensors file ({e}); download the model again") from None
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


class Checkpoint:
    """Tensors of a safetensors checkpoint read one at a time into fresh CPU tensors (plain reads at
    the tensor's offset, no memory map): the host holds what the caller keeps, nothing more."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._headers: dict[Path, dict[str, Any]] = {}
        self._open: dict[Path, BinaryIO] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()
        self._headers.clear()

    def _entry(self, key: str) -> tuple[Path, dict[str, Any], int]:
        f = self.files[key]
        if f not in self._headers:
            self._headers[f] = read_header(f)
        header = self._headers[f]
        if key not in header:
            raise QloraError(f"{f}: has no tensor {key!r} (listed in {SAFETENSORS_INDEX}); download the model again")
        return f, header[key], header["__data_start__"]

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``."""
        return self._read(key, None)

    def row(self, key: str, index: int) -> torch.Tensor:
        """``tensor(key)[index]`` read alone (one expert of a fused (E, out, in) weight)."""
        return self._read(key, index)

    def _read(self, key: str, index: int | None) -> torch.Tensor:
        f, entry, start = self._entry(key)
        dtype, shape = _DTYPES.get(entry["dtype"]), list(entry["shape"])
        if dtype is None:
            raise QloraError(f"{f}: {key} has dtype {entry['dtype']}, which we cannot load")
        begin, end = entry["data_offsets"]
        if index is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if f not in self._open:
            self._open[f] = open(f, "rb")  # noqa: SIM115 - closed by __exit__
        fh = self._open[f]
        fh.seek(start + begin)
        if fh.readinto(memoryview(buf.numpy())) != end - begin:
            raise QloraError(f"{f}: truncated at {key}; download the model again")
        return buf.view(dtype).reshape(shape)


def model_key(key: str, names: set[str]) -> str | None:
    """The model's name for checkpoint key ``key`` (``names``: the model's parameter and buffer names),
    or None when the model has no such tensor."""
    if key in names:
        return key
    chained = key
    for old, new in MODULE_RENAMES:
        chained = chained.replace(old, new)
        for renamed in (key.replace(old, new), chained):
            if renamed in names:
                return renamed
    return None


def expert_keys(keys: list[str], modules: set[str]) -> dict[tuple[str, int, str], str]:
    """(experts module, expert, role ``gate|up|down``) -> checkpoint key, for per-expert checkpoints.
    ``modules``: the model's fused experts module names."""
    out: dict[tuple[str, int, str], str] = {}
    for key in keys:
        m = _EXPERT_KEY.match(key)
        if m is None or m["weight"] not in EXPERT_ROLES:
            continue
        module = model_key(m["module"], modules)
        if module is not None:
            out[(module, int(m["expert"]), EXPERT_ROLES[m["weight"]])] = key
    return out


class ExpertSource:
    """Where one fused experts module's weights are in a checkpoint: ``read(name, e)`` gives expert
    ``e`` of ``gate_up_proj`` (2I, H) or ``down_proj`` (H, I), whichever layout the file has."""

    def __init__(self, ckpt: Checkpoint, module: str, num_experts: int,
                 per_expert: dict[tuple[str, int, str], str], fused: dict[str, str]) -> None:
        self.ckpt, self.module, self.num_experts = ckpt, module, num_experts
        self.per_expert, self.fused = per_expert, fused

    def read(self, name: str, e: int) -> torch.Tensor:
        fused = self.fused.get(f"{self.module}.{name}")
        if fused is not None:
            return self.ckpt.row(fused, e)
        if name == "down_proj":
            return self.ckpt.tensor(self._key(e, "down"))
        return torch.cat([self.ckpt.tensor(self._key(e, "gate")), self.ckpt.tensor(self._key(e, "up"))])

    def keys(self) -> list[str]:
        """The checkpoint keys this module's weights come from."""
        fused = [k for n, k in self.fused.items() if n.startswith(self.module + ".")]
        return fused + [k for (m, _, _), k in self.per_expert.items() if m == self.module]

    def _key(self, e: int, role: str) -> str:
        key = self.per_expert.get((self.module, e, role))
        if key is None:
            raise QloraError(f"checkpoint: no weight for expert {e} ({role}) of {self.module} "
                             f"(looked for {self.module}.{e}.*.weight and {self.module}.gate_up_proj / down_proj "
                             f"in {sorted({f.name for f in self.ckpt.files.values()})}); download the model again")
        return key
