"""The frozen base weight object: one W for every caller, built once per layer, rebuilt on change;
the backend choice has no internal imports and the kernels / lora modules import in any order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from qlora_trainer.kernels.base_weight import COUNTS, BaseWeight, base_weight
from qlora_trainer.kernels.dispatch import lora_matmul

ROOT = Path(__file__).resolve().parents[2]


def _nf4_layer(out_f=48, in_f=80):
    import bitsandbytes as bnb

    from qlora_trainer.models.nf4_linear import claim_4bit_layers

    lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f) * 0.1, requires_grad=False, quant_type="nf4")
    lin.weight = lin.weight._quantize("cpu") if hasattr(lin.weight, "_quantize") else lin.weight.to("cpu")
    claim_4bit_layers(lin, backend="torch")
    return lin


def test_built_once_and_rebuilt_when_the_weight_changes():
    lin = nn.Linear(16, 8).requires_grad_(False)
    first = base_weight(lin, "torch")
    assert isinstance(first, BaseWeight) and base_weight(lin, "torch") is first
    assert base_weight(lin, "triton") is not first  # backend is part of the key
    with torch.no_grad():
        lin.weight.add_(1.0)  # in place: version bump
    second = base_weight(lin, "torch")
    assert second is not first and second.dense is lin.weight
    lin.weight = nn.Parameter(torch.zeros(8, 16), requires_grad=False)  # a new tensor
    assert base_weight(lin, "torch").dense is lin.weight
    lin.weight.requires_grad_(True)  # trainable: the kernels do not read it
    assert base_weight(lin, "torch") is None
    x = torch.randn(3, 16)
    y = lora_matmul(x, lin, torch.zeros(2, 16), torch.zeros(8, 2), 1.0, backend="torch")
    torch.testing.assert_close(y, lin(x))


def test_one_dequantization_serves_forward_merge_and_dora():
    """LoRALinear's forward, merged weight, DoRA norm and lora.base.dequantized_weight all read W
    from the same cached object (one NF4 decode per request, counted)."""
    from qlora_trainer.lora.base import dequantized_weight
    from qlora_trainer.lora.layer import AdapterSpec, LoRALinear

    base = _nf4_layer()
    layer = LoRALinear(base, backend="torch")
    layer.add_adapter("d", AdapterSpec.from_variant("dora", r=4, alpha=8), dtype=torch.float32)
    bw = base_weight(base, "torch")
    assert base_weight(base, "torch") is bw
    w = bw.weight()
    torch.testing.assert_close(dequantized_weight(base, "torch"), w, rtol=0, atol=0)
    COUNTS.clear()
    merged = layer.merged_weight("d")
    assert COUNTS["dequant"] == 1
    x = torch.randn(5, 80)
    torch.testing.assert_close(layer(x), x @ merged.t() + base.bias, rtol=1e-5, atol=1e-5)
    assert base_weight(base, "torch") is bw  # not rebuilt by the calls


def test_backend_module_has_no_internal_imports():
    tree = ast.parse((ROOT / "kernels" / "backend.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and all(isinstance(n, ast.Import) or (n.level == 0 and not n.module.startswith("qlora"))
                           for n in imports)


def test_modules_import_in_any_order():
    """dora before layer (the old lora/layer.py <-> dora.py cycle), nf4 before dispatch (kernels/)."""
    code = ("import qlora_trainer.kernels.nf4, qlora_trainer.kernels.lora_linear; import qlora_trainer.lora.dora;"
            " import qlora_trainer.lora.layer, qlora_trainer.kernels.dispatch")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
