"""GPU microbenchmark: our Triton RMSNorm (plain and fused with the residual add) / RoPE / SwiGLU vs the torch references (eager and, with
``--compile``, torch.compile), forward and forward+backward, at Llama-7B/8B layer shapes; also Gemma's
RMSNorm weighting, GeGLU and SwiGLU on a fused gate_up projection (Phi-3) at the same shapes.

All three ops are memory-bound, so each row also reports achieved bandwidth against the fewest
bytes the op must move (every input read once, every output written once) — compare with the
device's measured copy bandwidth (printed as ``copy_gbps``). Median of ``triton.testing.do_bench``
over fresh random (non-zero) bf16 inputs. Not run in tests (needs CUDA)::

    python benchmarks/kernels/bench_norm_rope_swiglu.py --out bench_norm_rope_swiglu.json

``--ptx`` needs no GPU: it compiles every kernel for sm_90 (bf16, 16-divisible sizes, as the JIT
specialises real launches) and prints the global load/store widths and whether anything spilled
to local memory (``TRITON_INTERPRET`` must be unset).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _copy_gbps() -> float:
    import triton

    src = torch.randn(256 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def _cases(tokens: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int):
    """(name, make_inputs, triton_fn, torch_fn, fwd_bytes, fwd_bwd_bytes) per op; bf16 = 2 bytes."""
    from qlora_trainer.kernels.rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
    from qlora_trainer.kernels.rope import apply_rope, rope_reference
    from qlora_trainer.kernels.swiglu import gated_fused, swiglu, swiglu_reference

    bf = torch.bfloat16
    eps = 1e-5

    def norm_inputs():
        x = torch.randn(tokens, hidden, device="cuda", dtype=bf, requires_grad=True)
        w = (torch.rand(hidden, device="cuda") + 0.5).to(bf).requires_grad_()
        return x, w

    def add_norm_inputs():
        x, w = norm_inputs()
        return x, torch.randn_like(x, requires_grad=True), w

    def rope_inputs():
        q = torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=bf, requires_grad=True)
        k = torch.randn(1, tokens, kv_heads, head_dim, device="cuda", dtype=bf, requires_grad=True)
        ang = torch.rand(1, tokens, head_dim, device="cuda") * 6.28
        return q, k, ang.cos().to(bf), ang.sin().to(bf)

    def swiglu_inputs():
        g = torch.randn(tokens, inter, device="cuda", dtype=bf, requires_grad=True)
        u = torch.randn(tokens, inter, device="cuda", dtype=bf, requires_grad=True)
        return g, u

    x_b, qk_b, cs_b, gi_b = tokens * hidden * 2, tokens * (heads + kv_heads) * head_dim * 2, \
        tokens * head_dim * 2 * 2, tokens * inter * 2
    return [
        ("rmsnorm", norm_inputs, lambda x, w: rms_norm(x, w, eps, "triton"),
         lambda x, w: rms_norm_reference(x, w, eps), 2 * x_b, 2 * x_b + 3 * x_b),
        # fused: fwd reads x, r, writes s, y; bwd reads dy, ds_out, s, writes ds (= dx = dr)
        ("add_rmsnorm", add_norm_inputs, lambda x, r, w: add_rms_norm(x, r, w, eps, "triton"),
         lambda x, r, w: add_rms_norm_reference(x, r, w, eps), 4 * x_b, 4 * x_b + 4 * x_b),
        ("rope", rope_inputs, lambda q, k, c, s: apply_rope(q, k, c, s, "triton"),
         rope_reference, 2 * qk_b + cs_b, 2 * qk_b + cs_b + 2 * qk_b + cs_b),
        ("swiglu", swiglu_inputs, lambda g, u: swiglu(g, u, "triton"), swiglu_reference,
         3 * gi_b, 3 * gi_b + 5 * gi_b),
        # other families: Gemma's (1 + w) norm weighted in fp32, GeGLU, Phi-3's fused gate_up
        ("rmsnorm_gemma", norm_inputs, lambda x, w: rms_norm(x, w, eps, "triton", offset=1.0, weight_fp32=True),
         lambda x, w: rms_norm_reference(x, w, eps, offset=1.0, weight_fp32=True), 2 * x_b, 2 * x_b + 3 * x_b),
        ("geglu", swiglu_inputs, lambda g, u: swiglu(g, u, "triton", "gelu_tanh"),
         lambda g, u: swiglu_reference(g, u, "gelu_tanh"), 3 * gi_b, 3 * gi_b + 5 * gi_b),
        ("swiglu_gate_up", lambda: (torch.cat(swiglu_inputs(), -1).detach().requires_grad_(),),
         lambda gu: gated_fused(gu, "triton"), lambda gu: gated_fused(gu, "torch"), 3 * gi_b, 3 * gi_b + 5 * gi_b),
    ]


def _time(fn, inputs, backward: bool) -> float:
    import triton

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if backward:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    for t in inputs:
        t.grad = None
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median",
                                   grad_to_none=[t for t in inputs if t.requires_grad])


def _ptx_report() -> int:
    """Compile each kernel for sm_90 without a device; report access widths and spills."""
    import re
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qlora_trainer.kernels import _triton_rmsnorm as rms, _triton_rope as rope, _triton_swiglu as sw

    llama = {"OFFSET": 0.0, "W_FP32": False}  # the RMSNorm weighting (kernels/rmsnorm.py)
    kernels = [("rmsnorm_fwd", rms._rmsnorm_fwd_kernel, {"BLOCK": 4096, "ADD": False, **llama}, 8),
               ("rmsnorm_bwd", rms._rmsnorm_bwd_kernel, {"BLOCK": 4096, "COMPUTE_DW": True, "ADD_DS": False,
                                                         **llama}, 8),
               ("add_rms_fwd", rms._rmsnorm_fwd_kernel, {"BLOCK": 4096, "ADD": True, **llama}, 8),
               ("add_rms_bwd", rms._rmsnorm_bwd_kernel, {"BLOCK": 4096, "COMPUTE_DW": True, "ADD_DS": True,
                                                         **llama}, 8),
               ("rope", rope._rope_kernel, {"BACKWARD": False, "BLOCK_HQ": 32, "BLOCK_HK": 8,
                                            "BLOCK_D": 64}, 4),
               ("swiglu_fwd", sw._gated_fwd_kernel, {"BLOCK": 1024, "GELU": False}, 4),
               ("swiglu_bwd", sw._gated_bwd_kernel, {"BLOCK": 1024, "GELU": False}, 4)]
    for name, fn, consts, warps in kernels:
        ints = {"H", "N", "T", "HQ", "HK", "n", "cols", "half", "rows_per_prog"}
        sig = {a: "constexpr" if a in consts else "fp32" if a == "eps" else
               "i32" if a in ints or a.startswith("stride") else
               "*fp32" if a in ("RSTD", "DW_PART") else "*bf16" for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a] not in ("constexpr", "fp32") and a != "rows_per_prog"}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        loads, stores = Counter(re.findall(r"ld\.global[\w.]*", ptx)), Counter(re.findall(r"st\.global[\w.]*", ptx))
        print(f"{name:12} loads {dict(loads)} stores {dict(stores)} local_memory={'.local' in ptx}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="batch * seq_len")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd references")
    p.add_argument("--out", default="bench_norm_rope_swiglu.json")
    p.add_argument("--ptx", action="store_true", help="no GPU needed: compile for sm_90, report PTX")
    a = p.parse_args(argv)
    if a.ptx:
        return _ptx_report()
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name, make, ours, ref, fwd_bytes, fb_bytes in _cases(a.tokens, a.hidden, a.intermediate,
                                                              a.heads, a.kv_heads, a.head_dim):
        impls = {"triton": ours, "torch": ref}
        if a.compile:
            impls["torch_compile"] = torch.compile(ref)
        for impl, fn in impls.items():
            for mode, nbytes in (("fwd", fwd_bytes), ("fwd_bwd", fb_bytes)):
                ms = _time(fn, make(), backward=mode == "fwd_bwd")
                rows.append({"op": name, "impl": impl, "mode": mode, "ms": ms,
                             "min_bytes": nbytes, "gbps": nbytes / ms / 1e6})
    result = {"device": torch.cuda.get_device_name(), "copy_gbps": _copy_gbps(), "args": vars(a),
              "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'op':8} {'impl':14} {'mode':8} {'ms':>8} {'GB/s':>8}   (copy {result['copy_gbps']:.0f} GB/s)")
    for r in rows:
        print(f"{r['op']:8} {r['impl']:14} {r['mode']:8} {r['ms']:8.3f} {r['gbps']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
