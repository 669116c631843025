"""Data-parallel training (train.distributed): per-rank data shards, launch checks, FSDP dtype rules,
and real 2-process runs through ``accelerate launch`` on the CPU (gloo): DDP and FSDP2 give the
one-process losses over the same global batch, the adapter is the one-process format, and a killed
2-process run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qlora_trainer.errors import ConfigError, QloraError

RUN = {
    "model": {"name_or_path": "random:tiny", "quantization": "nf4"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"path": "builtin:demo", "seq_len": 48, "max_samples": 50, "eval_fraction": 0.2,
             "template": "{instruction}\nInput: {input}\nOutput: "},
    "train": {"max_steps": 3, "lr": 3e-3, "batch_size": 2, "grad_accum": 1, "seed": 0, "device": "cpu",
              "optimizer": "adamw"},
    "eval": {"batches": 2},
    "output": {"progress_bar": False, "keep_last": 5},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path: Path, name: str, **sections) -> Path:
    raw = json.loads(json.dumps(RUN))
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            raw.setdefault(sec, {}).update(vals)
        else:
            raw[sec] = vals
    raw.setdefault("output_dir", str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _launch_cmd(config: Path, *extra: str) -> list[str]:
    """``accelerate launch`` with 2 CPU processes (``--multi_gpu`` picks the torchrun launcher; without a
    GPU accelerate then runs MULTI_CPU over gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "qlora_trainer.cli", "train", str(config), *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _launch(config: Path, tmp_path: Path, *extra: str) -> str:
    """Run a 2-process training to the end (cwd outside the repo: no top-level ``kernels`` on the path)."""
    p = subprocess.run(_launch_cmd(config, *extra), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _one_process(path: Path, tmp_path: Path, name: str, grad_accum: int) -> Path:
    """The same run in this process with ``grad_accum`` micro-batches: the 2-process global batch."""
    from qlora_trainer.config import load_config
    from qlora_trainer.train import train

    cfg = load_config(path, ["train.distributed=none", f"train.grad_accum={grad_accum}",
                             f"output_dir={tmp_path / name}"])
    train(cfg)
    return tmp_path / name


def _adapter(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return (json.loads((out / "adapter" / "adapter_config.json").read_text()),
            load_file(str(out / "adapter" / "adapter_model.safetensors")))


def _assert_same_run(two: Path, one: Path) -> None:
    """Same losses (fp32 tolerance: only the summation order differs), the same final eval loss
    (every rank evaluates through the engine) and the same adapter file."""
    l2, l1 = _losses(two), _losses(one)
    assert list(l2) == list(l1) == [1, 2, 3]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-5, abs=1e-6), (l2, l1)
    e2, e1 = _losses(two, "eval_loss"), _losses(one, "eval_loss")
    assert list(e2) == list(e1) == [3] and e2[3] == pytest.approx(e1[3], rel=1e-5)
    (c2, t2), (c1, t1) = _adapter(two), _adapter(one)
    assert c2 == c1 and set(t2) == set(t1)
    for k in t1:
        assert t2[k].dtype == t1[k].dtype and t2[k].shape == t1[k].shape
        # Adam gives every element a step of about lr (3e-3) whatever its gradient's size, so an element
        # whose gradient is near zero carries the summation-order rounding into the weights: 1.1e-5
        # seen once with torch 2.11 under AVX2 dispatch
        torch.testing.assert_close(t2[k], t1[k], rtol=1e-4, atol=5e-5)


# ------------------------------------------------------------------------------------------------
# fast: sharding, launch checks, FSDP dtype rules


def test_shard_order_strides_one_global_order():
    from qlora_trainer.data.collate import shard_order

    whole = shard_order(11, seed=3, epoch=1, shuffle=True)
    r0, r1 = (shard_order(11, seed=3, epoch=1, shuffle=True, rank=r, world=2) for r in (0, 1))
    assert sorted(whole) == list(range(11)) and len(r0) == len(r1) == 5
    assert [x for pair in zip(r0, r1) for x in pair] == whole[:10]  # one order, dealt out; 1 sample left over
    assert shard_order(11, seed=3, epoch=2, shuffle=True) != whole


@pytest.mark.parametrize("pack,group", [(True, False), (False, True)])
def test_each_rank_packs_or_groups_its_own_shard_with_equal_batch_counts(pack, group):
    from qlora_trainer.config import DataConfig
    from qlora_trainer.data import make_dataloader
    from qlora_trainer.models.tiny import byte_tokenizer

    rows = [{"input_ids": [i] + [200] * (2 + (7 * i) % 19), "labels": [i] + [200] * (2 + (7 * i) % 19)}
            for i in range(30)]  # the first token names the sample
    cfg = DataConfig(seq_len=32, pack=pack, group_by_length=group)
    tok = byte_tokenizer()
    ranks = [list(make_dataloader(rows, cfg=cfg, tokenizer=tok, batch_size=2, shuffle=True, seed=0, epoch=0,
                                  rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0

    def samples(batches: list[dict[str, torch.Tensor]]) -> list[int]:
        out = []
        for b in batches:
            starts = b["position_ids"] == 0 if pack else torch.zeros_like(b["input_ids"], dtype=torch.bool)
            if not pack:
                starts[:, 0] = True
            out += b["input_ids"][starts & (b["input_ids"] < 30)].tolist()
        return out
    s0, s1 = samples(ranks[0]), samples(ranks[1])
    assert len(set(s0)) == len(s0) and len(set(s1)) == len(s1) and not set(s0) & set(s1)
    assert len(s0) + len(s1) >= 24  # most of the 30 samples are read


def test_multi_process_launch_needs_distributed(monkeypatch, tiny_cfg):
    from qlora_trainer.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(QloraError, match="train.distributed=ddp"):
        distributed.setup(tiny_cfg)


def test_resume_with_another_process_count_is_refused(tmp_path):
    from qlora_trainer.train.checkpoint import rng_state
    from qlora_trainer.train.distributed import Parallel

    def par(rank: int, world: int) -> Parallel:
        return Parallel(None, "ddp" if world > 1 else "none", rank, world, torch.device("cpu"))

    torch.save(rng_state(), tmp_path / "rng.pt")  # a one-process checkpoint
    with pytest.raises(QloraError, match="written by 1 process.*--num_processes 1"):
        par(0, 2).restore_rng(tmp_path)
    torch.manual_seed(1)
    first = rng_state()
    torch.manual_seed(2)
    second = rng_state()
    torch.save(dict(first, ranks=[first, second]), tmp_path / "rng.pt")
    with pytest.raises(QloraError, match="--num_processes 2"):
        par(0, 1).restore_rng(tmp_path)
    par(1, 2).restore_rng(tmp_path)  # rank 1 gets its own stream back
    assert torch.equal(torch.get_rng_state(), second["torch"])


def test_fsdp_config_rules(tiny_cfg):
    tiny_cfg.train.distributed = "fsdp"
    with pytest.raises(ConfigError, match="quantization.quant_storage: FSDP shards floating-point"):
        tiny_cfg.validate()
    tiny_cfg.quantization.quant_storage = "float32"
    tiny_cfg.validate()
    tiny_cfg.lora.variant = "dora"
    with pytest.raises(ConfigError, match="lora.variant=dora"):
        tiny_cfg.validate()


def test_fsdp_refuses_a_quant_storage_it_would_cast():
    """bf16-stored NF4 bytes gathered as fp32 would be converted as numbers: refused before sharding."""
    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.train.distributed import check_fsdp_dtypes

    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)), compute_dtype=torch.float32,
                           quant_storage=torch.bfloat16)
    with pytest.raises(QloraError, match="quant_storage=float32"):
        check_fsdp_dtypes(model, torch.float32)
    check_fsdp_dtypes(model, torch.bfloat16)


def test_fsdp_all_gather_keeps_packed_nf4_bytes_and_quant_state():
    """bf16-stored NF4 codes include bf16 NaN bit patterns; FSDP2's gather must return them bit for
    bit (bitsandbytes issue 1945 reports NaN canonicalization on GPUs), and the layer must still
    find its quant_state on the gathered plain Parameter (our pre-hook)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora_trainer.models.quantize import quantize_model
    from qlora_trainer.train.distributed import _keep_quant_state, _single_process_group

    torch.manual_seed(0)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False)),
                           compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    packed = model[0].weight.data
    before = packed.view(torch.int16).clone()
    assert torch.isnan(packed).any()  # codes that read as NaN in bf16
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = model(x)
    _single_process_group(torch.device("cpu"))
    try:
        _keep_quant_state(model)
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        model.unshard()
        assert type(model[0].weight).__name__ != "Params4bit"  # bitsandbytes' metadata is gone here
        assert torch.equal(model[0].weight.data.view(torch.int16), before)
        assert torch.equal(model(x), ref)
    finally:
        dist.destroy_process_group()


def test_per_gpu_estimate_hand_computed():
    """tiny (hidden 128, intermediate 352, 2 layers, vocab 260, untied): FSDP on 2 GPUs shards the NF4
    base, embeddings and norms (ceil(bytes/2)); lm_head is gathered (full + its shard); the constants,
    adapters and optimizer are replicated; two gathered layers join the backward. DDP adds buckets."""
    from qlora_trainer.memory.estimate import estimate
    from qlora_trainer.models.catalog import get_arch

    arch = get_arch("tiny")
    h, i, kv, L, V = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim, arch.layers, arch.vocab
    kw = dict(seq_len=64, lora_r=4, checkpointing=True, optimizer="adamw")
    one = estimate(arch, **kw)
    fsdp = estimate(arch, gpus=2, distributed="fsdp", **kw)
    ddp = estimate(arch, gpus=2, distributed="ddp", **kw)
    layer_nf4 = (2 * h * h + 2 * h * kv + 3 * h * i) // 2           # 4 bits per weight
    assert one.components["base_nf4"] == L * layer_nf4
    assert fsdp.components["base_nf4"] == L * layer_nf4 // 2
    assert fsdp.components["embeddings"] == 2 * V * h // 2
    assert fsdp.components["lm_head"] == 2 * V * h + 2 * V * h // 2
    assert fsdp.components["norms_biases"] == -(-one.components["norms_biases"] // 2)
    assert fsdp.phases["backward"]["fsdp_gather"] == 2 * layer_nf4
    for same in ("quant_constants", "lora_params", "lora_grads", "optimizer_states"):
        assert fsdp.components[same] == one.components[same] == ddp.components[same]
    assert ddp.components["ddp_buckets"] == one.components["lora_grads"]
    assert ddp.allocated_bytes == one.allocated_bytes + one.components["lora_grads"]


def test_trainer_start_up_estimate_is_per_gpu(monkeypatch, tiny_cfg):
    from qlora_trainer.memory.estimate import estimate_for_config

    tiny_cfg.train.distributed, tiny_cfg.quantization.quant_storage = "fsdp", "float32"
    one = estimate_for_config(tiny_cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = estimate_for_config(tiny_cfg)
    assert (one.settings["gpus"], two.settings["gpus"]) == (1, 2)
    assert two.components["base_nf4"] == one.components["base_nf4"] // 2


def test_memory_command_per_gpu(capsys):
    from qlora_trainer.cli import main

    assert main(["memory", "llama-2-70b", "--seq", "512", "--budget", "24", "--gpus", "2",
                 "--distributed", "fsdp", "--offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["settings"]["gpus"] == 2 and out["settings"]["distributed"] == "fsdp"
    assert main(["memory", "llama-2-70b", "--seq", "512", "--budget", "24", "--gpus", "2"]) == 2
    assert "--distributed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 2 processes through accelerate launch (gloo on the CPU)


def test_ddp_two_processes_match_one_process_and_adapter_loads_alone(tmp_path):
    """DDP, 2 ranks x 2 micro-batches of 2 per step (no_sync on the first) == 1 process x 4
    micro-batches of 2 over the same samples (strided shards): equal losses and adapters; the
    adapter loads in one process."""
    cfg = _write(tmp_path, "ddp", train={"distributed": "ddp", "grad_accum": 2})
    _launch(cfg, tmp_path, "--quiet")
    one = _one_process(cfg, tmp_path, "one", grad_accum=4)
    _assert_same_run(tmp_path / "ddp", one)
    from qlora_trainer.lora.loading import load_with_adapters

    loaded = load_with_adapters([tmp_path / "ddp" / "adapter"], device="cpu")
    _, tensors = _adapter(tmp_path / "ddp")
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    layer = loaded.model.get_submodule(key.removeprefix("base_model.model.").rsplit(".lora_B", 1)[0])
    torch.testing.assert_close(layer.lora_B[loaded.names[-1]].detach().float(), tensors[key].float())


@pytest.mark.slow  # ~45 s; the default suite has the 2-process DDP launch and FSDP at world size 1
def test_fsdp_two_processes_shard_the_base_and_match_one_process(tmp_path):
    """FSDP2 fully_shard over gloo on CPU tensors (torch 2.13 supports it): each rank holds about half
    the frozen bytes, and the run equals the one-process run (fp32 NF4 storage on the CPU)."""
    cfg = _write(tmp_path, "fsdp", train={"distributed": "fsdp"}, quantization={"quant_storage": "float32"})
    log = _launch(cfg, tmp_path)
    held = [tuple(map(int, line.split("rank holds ")[1].split(" frozen")[0].split(" of ")))
            for line in log.splitlines() if "fsdp: rank holds" in line]
    assert len(held) == 2
    for local, total in held:
        assert total / 2 <= local <= total / 2 + 4096  # per-parameter padding to a multiple of 2 rows
    one = _one_process(cfg, tmp_path, "one", grad_accum=2)
    _assert_same_run(tmp_path / "fsdp", one)


def test_fsdp_world_size_one_matches_the_plain_path(tmp_path):
    """train.distributed=fsdp without a launcher: a process group of one, fully_shard on every layer,
    and the same losses as distributed=none (the CPU analogue of the one-GPU FSDP check)."""
    import torch.distributed as dist

    from qlora_trainer.config import load_config
    from qlora_trainer.train import train

    path = _write(tmp_path, "f1", train={"distributed": "fsdp", "max_steps": 2},
                  quantization={"quant_storage": "float32"}, data={"eval_fraction": 0.0})
    try:
        fsdp = train(load_config(path)).losses
        assert type(dist.group.WORLD).__name__ == "ProcessGroup" and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    plain = train(load_config(path, ["train.distributed=none", f"output_dir={tmp_path / 'p1'}"])).losses
    assert fsdp == pytest.approx(plain, rel=1e-6) and len(fsdp) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_resume_after_kill_is_exact(tmp_path, mode):
    """SIGKILL a 2-process run (dropout on, packing: per-rank RNG and data position matter) once its
    step-2 checkpoint exists; resume=auto with 2 processes logs the uninterrupted run's losses."""
    sections = dict(train={"distributed": mode, "max_steps": 6, "save_every": 2},
                    lora={"dropout": 0.1}, data={"pack": True, "max_samples": 24, "eval_fraction": 0.0},
                    quantization={"quant_storage": "float32" if mode == "fsdp" else "uint8"})
    full = _write(tmp_path, "full", **sections)
    _launch(full, tmp_path, "--quiet")
    part = _write(tmp_path, "part", **sections)
    proc = subprocess.Popen(_launch_cmd(part, "--quiet"), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "part" / "checkpoints" / "step-2"
    deadline = time.time() + 400
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    import psutil  # an accelerate dependency; torchrun's workers leave the launcher's process group

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and not (tmp_path / "part" / "adapter").exists()  # killed mid-run
    _launch(part, tmp_path, "resume=auto", "--quiet")
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # bit-exact
    assert len(torch.load(ckpt.parent / "step-6" / "rng.pt", weights_only=True)["ranks"]) == 2
