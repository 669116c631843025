"""One full training step of a small NF4 model with our kernels on (``performance.kernels: triton``) and off
(``torch`` references): same weights, same adapters, same tokens; the loss, every adapter gradient and
every adapter after the optimizer step must agree (part 1 of the suite). On CUDA, model preparation
self-checks the kernels first; a kernel it switched to its reference fails this check too
(``switched_to_reference``), since the step would no longer test it.

Adapters start from N(0, 0.05) rather than B = 0 so that every gradient is non-trivial; LoRA dropout
is 0 (the two backends draw their masks differently); the optimizer is torch AdamW on both sides.
Tolerances (‖kernels − reference‖ / ‖reference‖): fp32 loss 1e-5, grads / updated adapters 1e-4;
bf16 loss 1e-2, grads 5e-2, updated adapters 1e-2 (bf16 activations rounded at different points).
"""

from __future__ import annotations

import torch

MODEL = "tiny"  # hidden 128, intermediate 352 (not a multiple of the kernels' tiles), GQA 4/2 heads


def model_for(device: torch.device):
    """``tiny`` on CUDA; on the CPU (kernels under the interpreter, slow) 2 of its 4 layers."""
    import dataclasses

    from qlora_trainer.models.catalog import get_arch

    arch = get_arch(MODEL)
    return arch if device.type == "cuda" else dataclasses.replace(arch, layers=2)
TOL = {"float32": (1e-5, 1e-4, 1e-4), "bfloat16": (1e-2, 5e-2, 1e-2)}  # loss, grads, updated adapters


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def one_step(backend: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[float, list, list]:
    """(loss, adapter grads, adapters after one AdamW step) of the tiny NF4 model on ``backend``."""
    from qlora_trainer.config import Config
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.train import build_optimizer, causal_lm_loss, prepare_model

    cfg = Config()
    cfg.performance.kernels = backend
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets = 8, 16.0, 0.0, "all-linear"
    cfg.lora.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "adamw", 1e-3, 0.0
    cfg.validate()
    model = synthetic_nf4_model(model_for(device), device=device, compute_dtype=dtype, seed=seed, gen_device="cpu")
    torch.manual_seed(seed)
    model = prepare_model(model, cfg, device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, model.config.vocab_size - 4, (2, 29), generator=g)  # odd token count
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
    loss_sum, n = causal_lm_loss(model, batch, backend=backend)
    loss = loss_sum / n
    loss.backward()
    grads = [p.grad.detach().float().cpu() for p in params]
    opt.step()
    return float(loss.detach()), grads, [p.detach().float().cpu() for p in params]


def compare_step(device: str, dtype: str, *, seed: int = 0) -> dict:
    """Run the step with kernels on and off for fp32 and (on CUDA) bf16; one result per dtype plus an
    overall ``status`` (``ok`` when every check holds)."""
    dev = torch.device(device)
    dtypes = ["float32", "bfloat16"] if dev.type == "cuda" else ["float32"]
    checks, ok = {}, True
    for name in dtypes:
        dt = getattr(torch, name)
        try:
            on, off = one_step("triton", dev, dt, seed), one_step("torch", dev, dt, seed)
        except Exception as e:  # noqa: BLE001 - a CUDA failure becomes a result, not a crash
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            ok = False
            continue
        t_loss, t_grad, t_param = TOL[name]
        c = {"loss_kernels": on[0], "loss_reference": off[0], "loss_rdiff": abs(on[0] - off[0]) / abs(off[0]),
             "grad_rdiff_max": max(_rel(a, b) for a, b in zip(on[1], off[1])),
             "param_rdiff_max": max(_rel(a, b) for a, b in zip(on[2], off[2])),
             "n_adapter_tensors": len(on[1]), "tolerances": list(TOL[name])}
        c["ok"] = (c["loss_rdiff"] <= t_loss and c["grad_rdiff_max"] <= t_grad and c["param_rdiff_max"] <= t_param
                   and all(torch.isfinite(x).all() for x in on[1]))
        ok &= c["ok"]
        checks[name] = c
    from qlora_trainer.kernels.backend import reference_kernels

    switched = reference_kernels()  # kernels the self-check at model preparation switched to their references
    arch = model_for(dev)
    return {"status": "ok" if ok and not switched else "failed",
            "model": f"{arch.name} (intermediate {arch.intermediate})", "device": device, "checks": checks,
            "switched_to_reference": switched}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.kernel_step DEVICE DTYPE SEED ROW_JSON``: :func:`compare_step` in its own
    process (the suite's part 1 runs it so, boxed: a CUDA fault or a hang costs this row only)."""
    import json
    import sys
    from pathlib import Path

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print("usage: python -m benchmarks.kernel_step DEVICE DTYPE SEED ROW_JSON", file=sys.stderr)
        return 2
    from benchmarks.stage import assert_not_shadowed
    from qlora_trainer.io import atomic_write_text

    assert_not_shadowed()
    row = {"kind": "kernel_step", **compare_step(argv[0], argv[1], seed=int(argv[2]))}
    atomic_write_text(Path(argv[3]), json.dumps(row))
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
