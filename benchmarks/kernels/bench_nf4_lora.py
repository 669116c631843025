"""GPU microbenchmarks for kernels part A: NF4 dequant, LoRA linear over NF4, chunked linear CE.

Not run in tests (needs CUDA and the package installed: ``pip install -e .``). Usage on the
device machine, from the repo root:

    python benchmarks/kernels/bench_nf4_lora.py --out "$OUT/bench_nf4_lora.json" [--quick]

Every case is checked against its reference before it is timed (fresh random inputs, never
zeros), timed with ``triton.testing.do_bench`` (CUDA events, warm-up, median over repeats), and
reported next to its floor: bytes moved / measured copy bandwidth for the memory-bound dequant,
FLOPs / measured bf16 GEMM rate for the matmuls. Rows:

* ``dequant``: ours (Triton) vs ``bitsandbytes.functional.dequantize_4bit`` -> bf16, Llama shapes.
* ``lora_fwd_bwd``: one LoRA linear forward + backward (grads x, A, B) over an NF4 weight:
  ours (auto / fused / dequant+cuBLAS) vs the HF/PEFT path (``Linear4bit`` + torch LoRA), and a
  bf16 dense cuBLAS layer (the floor we try to approach), for token counts 1 .. 8192.
* ``linear_ce``: loss + d hidden through the lm_head: ours (Triton chunk kernel, torch chunk op)
  vs full logits + ``F.cross_entropy``; time and peak memory.
* ``nf4_paths`` / ``nf4_paths_winner`` (also part 6 of ``python -m benchmarks.suite``): the three
  large-M paths of ``performance.nf4_matmul`` (``dequant`` + cuBLAS, ``chunked`` with 8 and 32 MiB
  chunks, ``fused``), forward
  ``x @ W^T`` and dx ``dy @ W`` of every projection shape of Llama-3-8B and Llama-2-7B at M buckets
  256 .. 4096 tokens, then per (model, M) the decoder layer's sum (forward twice: forward + the
  checkpoint recompute, down_proj's once; dx once) and which path wins it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def _bench(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` (CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ceilings() -> dict[str, float]:
    """Measured device-to-device copy bandwidth (GB/s, read+write) and bf16 GEMM rate (TFLOP/s)."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = _bench(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * 2 / ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}


def _nf4_linear(out_f: int, in_f: int):
    from qlora_trainer.kernels.nf4 import NF4Weight
    from qlora_trainer.models.quantize import quantize_linear

    lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device="cuda")
    q = quantize_linear(lin, compute_dtype=torch.bfloat16, device="cuda")
    return q, NF4Weight.from_bnb(q.weight.data, q.weight.quant_state)


def bench_dequant(shapes, ceil) -> list[dict]:
    from qlora_trainer.kernels.nf4 import dequantize_nf4

    rows = []
    for out_f, in_f in shapes:
        _, w = _nf4_linear(out_f, in_f)
        ours = dequantize_nf4(w, torch.bfloat16, backend="triton")
        ref = dequantize_nf4(w, torch.bfloat16, backend="torch")
        assert torch.isfinite(ours).all()
        max_ulps = ((ours.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30) * 2**7).max().item()
        n = out_f * in_f
        bytes_moved = n // 2 + n * 2 + n // w.blocksize
        t_ours = _bench(lambda: dequantize_nf4(w, torch.bfloat16, backend="triton"))
        t_bnb = _bench(lambda: dequantize_nf4(w, torch.bfloat16, backend="torch"))
        rows.append({"case": "dequant", "shape": [out_f, in_f], "ours_ms": t_ours, "bnb_ms": t_bnb,
                     "speedup": t_bnb / t_ours, "floor_ms": bytes_moved / ceil["copy_GBps"] / 1e6,
                     "ours_GBps": bytes_moved / t_ours / 1e6, "max_rel_ulps_vs_bnb": max_ulps})
    return rows


def bench_lora(shapes, tokens, rank, ceil) -> list[dict]:
    from qlora_trainer.kernels.dispatch import lora_matmul
    from qlora_trainer.kernels.lora_linear import BaseWeight, lora_linear

    rows = []
    for out_f, in_f in shapes:
        q, _ = _nf4_linear(out_f, in_f)
        base = BaseWeight.from_module(q)
        w_dense = base.weight(torch.bfloat16).requires_grad_(False)
        a = (torch.randn(rank, in_f, device="cuda") * 0.01).bfloat16().requires_grad_()
        b = (torch.randn(out_f, rank, device="cuda") * 0.01).bfloat16().requires_grad_()
        for m in tokens:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)

            def step(fwd):
                y = fwd()
                torch.autograd.grad(y, (x, a, b), dy)

            variants = {
                "ours_auto": lambda: lora_linear(x, base, a, b, 2.0),
                "ours_fused": lambda: lora_linear(x, base, a, b, 2.0, decode=True),
                "ours_dequant_cublas": lambda: lora_linear(x, base, a, b, 2.0, decode=False),
                "hf_peft_bnb": lambda: lora_matmul(x, q, a, b, 2.0, backend="torch"),
                "dense_bf16_floor": lambda: x @ w_dense.t() + (x @ a.t() @ b.t()) * 2.0,
            }
            ref = variants["hf_peft_bnb"]()
            row = {"case": "lora_fwd_bwd", "shape": [out_f, in_f], "tokens": m, "rank": rank}
            for name, fwd in variants.items():
                if name == "ours_fused" and m > 2048:
                    continue  # the fused kernel targets small token counts; 256..2048 finds the crossover
                err = _rel(fwd(), ref)
                assert err < 2e-2, f"{name} M={m} {out_f}x{in_f}: rel err {err}"
                row[f"{name}_ms"] = _bench(lambda: step(fwd))
            flops = 2 * 2 * m * out_f * in_f  # two base GEMMs (y and dx; W frozen: no dW), LoRA ~r/in extra
            row["gemm_floor_ms"] = flops / ceil["bf16_TFLOPs"] / 1e9
            row["speedup_vs_hf"] = row["hf_peft_bnb_ms"] / row["ours_auto_ms"]
            rows.append(row)
    return rows


def bench_ce(cases, ceil) -> list[dict]:
    import torch.nn.functional as F

    from qlora_trainer.kernels.cross_entropy import linear_cross_entropy

    rows = []
    for n, hid, vocab in cases:
        h = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(vocab, hid, device="cuda", dtype=torch.bfloat16) * 0.02
        y = torch.randint(0, vocab, (n,), device="cuda")
        y[::7] = -100

        def full():
            return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")

        variants = {
            "ours_triton": lambda: linear_cross_entropy(h, w, y, backend="triton")[0],
            "ours_torch_chunks": lambda: linear_cross_entropy(h, w, y, backend="torch")[0],
            "full_logits": full,
        }
        ref = full().item()
        row = {"case": "linear_ce", "tokens": n, "hidden": hid, "vocab": vocab}
        for name, fn in variants.items():
            got = fn().item()
            assert abs(got - ref) / abs(ref) < 1e-2, f"{name}: {got} vs {ref}"

            def step(fn=fn):
                torch.autograd.grad(fn(), (h,))

            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f"{name}_peak_MiB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            row[f"{name}_ms"] = _bench(step)
        row["gemm_floor_ms"] = 2 * 2 * n * hid * vocab / ceil["bf16_TFLOPs"] / 1e9  # logits + dh GEMMs
        rows.append(row)
    return rows


# (model, projections as (name, out, in)) and the M buckets, headline first (8B/2048, 7B/512)
PATH_MODELS = {
    "llama-3-8b": [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
                   ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)],
    "llama-2-7b": [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                   ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}
PATH_BUCKETS = [("llama-3-8b", 2048), ("llama-2-7b", 512), ("llama-3-8b", 4096), ("llama-2-7b", 2048),
                ("llama-3-8b", 512), ("llama-2-7b", 256), ("llama-3-8b", 1024), ("llama-2-7b", 1024)]
# variant -> (performance.nf4_matmul path, chunk bytes): the chunked path at its default 8 MiB and at 32 MiB
# (a quarter of the launches; does the chunk still stay in a 50 MB L2?)
PATHS = {"dequant": ("dequant", 8 << 20), "chunked": ("chunked", 8 << 20), "chunked_32mib": ("chunked", 32 << 20),
         "fused": ("fused", 8 << 20)}


def _time_cpu(fn) -> float:
    """Milliseconds of one call after one warm-up call (the dry run: interpreter, no CUDA events)."""
    import time

    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_paths(models: dict, buckets: list[tuple[str, int]], *, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16, deadline: float | None = None, emit=None,
                rep_ms: int = 100) -> list[dict]:
    """Rows ``nf4_paths`` (one projection shape at one M: forward and dx ms per path, each checked
    against dequant + matmul first) and ``nf4_paths_winner`` (per complete (model, M): the layer
    sum per path and the winner). Stops before a (model, M) when ``deadline`` (epoch s) is near;
    ``emit(row)`` is called on each row as it is made (the suite writes it at once)."""
    import time

    import bitsandbytes.functional as bnbF

    from qlora_trainer.kernels.base_weight import BaseWeight
    from qlora_trainer.kernels.nf4 import NF4Weight

    timer = (lambda fn: _bench(fn, warmup_ms=rep_ms // 4, rep_ms=rep_ms)) if device == "cuda" else _time_cpu
    emit = emit or (lambda r: r)
    rows, cache, weights = [], {}, {}
    for model, m in buckets:
        if deadline is not None and time.time() > deadline - (3.0 if device != "cuda" else 8.0):
            break
        layer = {p: 0.0 for p in PATHS}
        for name, out_f, in_f in models[model]:
            key = (out_f, in_f, m)
            if key not in cache:
                if (out_f, in_f) not in weights:
                    w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
                    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                    state.dtype = dtype
                    weights[(out_f, in_f)] = NF4Weight.from_bnb(packed, state)
                nf4 = weights[(out_f, in_f)]
                x = torch.randn(m, in_f, device=device, dtype=dtype)
                dy = torch.randn(m, out_f, device=device, dtype=dtype)
                row = {"kind": "nf4_paths", "model": model, "proj": name, "shape": [out_f, in_f], "tokens": m,
                       "dtype": str(dtype).removeprefix("torch."), "fwd_ms": {}, "dx_ms": {}, "rel_err": {}}
                ref = None
                for path, (large_m, chunk) in PATHS.items():
                    bw = BaseWeight(nf4=nf4, backend="triton", large_m=large_m, chunk_bytes=chunk)
                    got = (bw.forward_matmul(x), bw.backward_matmul(dy))
                    ref = ref or got
                    row["rel_err"][path] = max(_rel(got[0], ref[0]), _rel(got[1], ref[1]))
                    assert row["rel_err"][path] < 2e-2, f"{path} {out_f}x{in_f} M={m}: {row['rel_err'][path]}"
                    row["fwd_ms"][path] = timer(lambda: bw.forward_matmul(x))
                    row["dx_ms"][path] = timer(lambda: bw.backward_matmul(dy))
                row["winner_fwd"] = min(PATHS, key=row["fwd_ms"].get)
                row["winner_dx"] = min(PATHS, key=row["dx_ms"].get)
                cache[key] = row
                rows.append(emit(row))
            row = cache[key]
            fwd_passes = 1 if name == "down_proj" else 2  # the recompute skips down_proj's base GEMM
            for p in PATHS:
                layer[p] += fwd_passes * row["fwd_ms"][p] + row["dx_ms"][p]
        win = {"kind": "nf4_paths_winner", "model": model, "tokens": m, "layer_ms": layer,
               "winner": min(PATHS, key=layer.get), "default": "dequant",
               "speedup_vs_dequant": {p: layer["dequant"] / layer[p] for p in PATHS}}
        rows.append(emit(win))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_nf4_lora.json", help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="one shape per benchmark")
    parser.add_argument("--paths-only", action="store_true", help="only the nf4_matmul path rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_nf4_lora needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
    tokens = [1, 16, 64, 256, 2048, 8192]
    ce_cases = [(4096, 4096, 128256), (8192, 4096, 32000)]
    if args.quick:
        shapes, tokens, ce_cases = shapes[:1], [16, 2048], ce_cases[:1]
    ceil = _ceilings()
    buckets = PATH_BUCKETS[:2] if args.quick else PATH_BUCKETS
    rows = [] if args.paths_only else bench_dequant(shapes, ceil) + bench_lora(shapes[:3], tokens, 16, ceil) + bench_ce(ce_cases, ceil)
    rows += bench_paths(PATH_MODELS, buckets)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "ceilings": ceil, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"ceilings: {ceil}")
    for r in rows:
        if r["case" if "case" in r else "kind"] in ("nf4_paths", "nf4_paths_winner"):
            print(json.dumps(r))
            continue
        keys = [k for k in r if k.endswith("_ms") or k in ("speedup", "speedup_vs_hf")]
        label = f"{r['case']:<13}{str(r.get('shape', [r.get('hidden'), r.get('vocab')])):<15}{r.get('tokens', ''):>6}"
        print(label, " ".join(f"{k}={r[k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
