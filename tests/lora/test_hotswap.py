"""Hot-swapping adapters into one rank-padded slot, on the fp32 tiny model and its NF4 version.

Each swapped-in adapter gives that adapter's own logits (loaded normally on a second base) within
atol 1e-5 (fp32: the scale folded into B and the zero padding change rounding only); swapping the
same adapter in again gives bit-identical logits; no module or parameter is re-created and no
parameter's storage moves (asserted by identity and data pointer). A ``torch.compile``d model
(eager backend) runs every swap without recompiling.
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.errors import QloraError
from qlora_trainer.lora import (hotswap_adapter, inject_lora, load_adapter, lora_layers, prepare_hotswap,
                                read_adapter, save_adapter)
from qlora_trainer.lora.weights import AdapterWeights

# name -> (variant, r, alpha, targets, seed)
ADAPTERS = {"a": ("lora", 4, 8, "all-linear", 1), "b": ("rslora", 2, 8, ["q_proj", "v_proj"], 2),
            "c": ("lora", 8, 4, ["q_proj", "v_proj", "down_proj", "up_proj"], 3)}
DORA = {"d1": ("dora", 4, 8, "all-linear", 4), "d2": ("dora", 2, 2, "all-linear", 5)}


def _save(tiny_base, root, specs: dict, nf4: bool) -> dict:
    dirs = {}
    for name, (variant, r, alpha, targets, seed) in specs.items():
        model, cfg = tiny_base(nf4), LoRAConfig(r=r, alpha=alpha, variant=variant, targets=targets, dropout=0.0)
        torch.manual_seed(seed)
        inject_lora(model, cfg, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.1)
                for m in layer.lora_magnitude_vector.values():
                    m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
        dirs[name] = save_adapter(model, root / name, cfg=cfg, base_model="random:tiny")
    return dirs


def _identity(model) -> dict:
    return {"modules": {n: id(m) for n, m in model.named_modules()},
            "params": {n: (id(p), p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()}}


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_hotswap_gives_each_adapters_logits_in_place(tmp_path, nf4, kind, tiny_base, logits_of, probe_ids):
    specs = ADAPTERS if kind == "lora" else DORA
    dirs = _save(tiny_base, tmp_path, specs, nf4)
    ids = probe_ids
    ref = tiny_base(nf4)
    expected = {}
    for name, d in dirs.items():
        load_adapter(ref, d, adapter_name=name, dtype=torch.float32)
        expected[name] = logits_of(ref, ids)
    adapters = {name: read_adapter(d) for name, d in dirs.items()}

    model = tiny_base(nf4)
    rank = prepare_hotswap(model, list(adapters.values()), dtype=torch.float32)
    assert rank == max(r for _, r, *_ in specs.values())
    before = _identity(model)
    first = {}
    for name, weights in adapters.items():
        hotswap_adapter(model, weights)
        first[name] = logits_of(model, ids)
        torch.testing.assert_close(first[name], expected[name], atol=1e-5, rtol=1e-5)
    names = list(adapters)
    assert (first[names[0]] - first[names[1]]).abs().max() > 1e-3  # the adapters differ
    hotswap_adapter(model, adapters[names[0]])
    assert torch.equal(logits_of(model, ids), first[names[0]])  # swapping back is exact
    assert _identity(model) == before  # nothing re-created, no storage moved


def test_hotswap_refusals_change_nothing(tmp_path, tiny_base, logits_of, probe_ids):
    dirs = _save(tiny_base, tmp_path, {k: ADAPTERS[k] for k in ("b", "c")}, nf4=False)
    b, c = read_adapter(dirs["b"]), read_adapter(dirs["c"])
    model = tiny_base(False)
    prepare_hotswap(model, [b])  # slot: q/v, rank 2
    hotswap_adapter(model, b)
    ids = probe_ids
    want = logits_of(model, ids)
    with pytest.raises(QloraError, match="does not cover"):
        hotswap_adapter(model, c)  # c also adapts down_proj/up_proj
    narrow = AdapterWeights(layers={n: lw for n, lw in c.layers.items() if n in b.layers}, config=c.config)
    with pytest.raises(QloraError, match="takes rank <= 2"):
        hotswap_adapter(model, narrow)  # rank 8 > 2
    assert torch.equal(logits_of(model, ids), want)
    with pytest.raises(QloraError, match="below the largest adapter rank 8"):
        prepare_hotswap(tiny_base(False), [c], rank=4)
    dora = read_adapter(_save(tiny_base, tmp_path / "d", {"d2": DORA["d2"]}, nf4=False)["d2"])
    with pytest.raises(QloraError, match="DoRA and plain LoRA"):
        prepare_hotswap(tiny_base(False), [b, dora])


def test_compiled_model_does_not_recompile_on_swap(tmp_path, tiny_base, probe_ids):
    import torch._dynamo

    dirs = _save(tiny_base, tmp_path, ADAPTERS, nf4=False)
    adapters = [read_adapter(d) for d in dirs.values()]
    model = tiny_base(False).eval()
    prepare_hotswap(model, adapters)
    ids = probe_ids
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    hotswap_adapter(model, adapters[0])
    with torch.no_grad():
        compiled(ids)
        compiled(ids)  # kernels.base_weight.COUNTS fills on the first call: one recompile, before any swap
        outs = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for w in adapters:
                hotswap_adapter(model, w)
                outs.append(compiled(ids).logits)
                torch.testing.assert_close(outs[-1], model(ids).logits, atol=1e-5, rtol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    torch._dynamo.reset()


def test_generate_hotswaps_each_adapter(tmp_path):
    """``generate --adapter x --adapter y`` (a LoRA and a DoRA adapter: two slots) answers as each
    adapter loaded on its own does, greedy; ``--no-hotswap`` answers the same. 16-bit base."""
    from qlora_trainer.cli import main
    from qlora_trainer.config import Config
    from qlora_trainer.models.load import load_base_model
    from qlora_trainer.models.tiny import byte_tokenizer

    tok, prompt = byte_tokenizer(), "Hello there"
    want = {}
    for name, variant, seed in [("x", "lora", 1), ("y", "dora", 3)]:
        cfg = Config()
        cfg.model.name_or_path, cfg.model.quantization, cfg.train.device = "random:tiny", "none", "cpu"
        cfg.lora = LoRAConfig(r=4 if name == "x" else 2, alpha=8, variant=variant, dropout=0.0)
        model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=260).eval()
        torch.manual_seed(seed)
        inject_lora(model, cfg.lora, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.3)
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=259, eos_token_id=258)
        want[name] = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        save_adapter(model, tmp_path / name, cfg=cfg.lora, base_model="random:tiny", tokenizer=tok, run_config=cfg)
    assert want["x"] != want["y"]
    for extra in (["--no-hotswap"], []):
        out = tmp_path / f"gen{len(extra)}.jsonl"
        assert main(["generate", "--adapter", str(tmp_path / "x"), "--adapter", str(tmp_path / "y"), "--prompt",
                     prompt, "--template", "raw", "--max-new-tokens", "5", "--output", str(out), *extra]) == 0
        got = {r["adapter"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
        assert got == want
