"""llama.cpp itself as the reference runtime for exported GGUF files: its C API through a prebuilt
CPU build (the cffi extension ``_llama_cpp_cpu`` of the ``llama-cpp-cffi`` 0.4.42 wheel; no compiler
toolchain, no llama.cpp build). ``QLORA_LLAMA_CPP`` names a directory holding that extension and
``cffi``; ``python benchmarks/export_llamacpp.py --setup DIR`` makes one. Where the system's libstdc++
predates GCC 14, the directory also holds ``libcxa_shim.so`` (the one C++ runtime symbol the build
needs beyond it, ``__cxa_call_terminate``; it only aborts) and it is loaded first."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

ENV = "QLORA_LLAMA_CPP"


def _lib():
    where = os.environ.get(ENV)
    if not where:
        raise ImportError(f"{ENV} is not set")
    if where not in sys.path:
        sys.path.insert(0, where)
    shim = Path(where) / "libcxa_shim.so"
    if shim.is_file():
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    from _llama_cpp_cpu import ffi, lib

    return lib, ffi


def available() -> bool:
    try:
        _lib()
    except (ImportError, OSError):
        return False
    return True


class LlamaCpp:
    """A GGUF model (optionally with a GGUF LoRA adapter at scale 1) in llama.cpp, CPU, one thread."""

    def __init__(self, model: Path, lora: Path | None = None, n_ctx: int = 128):
        self.lib, self.ffi = lib, ffi = _lib()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(model).encode(), mparams)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {model}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_ctx, n_ctx
        cparams.n_threads, cparams.n_threads_batch = 1, 1
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.adapter = None
        if lora is not None:
            self.adapter = lib.llama_adapter_lora_init(self.model, str(lora).encode())
            if self.adapter == ffi.NULL or lib.llama_set_adapter_lora(self.ctx, self.adapter, 1.0) != 0:
                raise RuntimeError(f"llama.cpp could not apply the adapter {lora}")

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), n_vocab) fp32 logits of one fresh forward over ``ids``."""
        lib = self.lib
        lib.llama_kv_self_clear(self.ctx)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
            for i in range(len(ids)):
                row = lib.llama_get_logits_ith(self.ctx, i)
                out[i] = np.frombuffer(self.ffi.buffer(row, 4 * self.n_vocab), dtype=np.float32)
            return out
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids`` (each step a fresh forward: exact, tiny models only)."""
        ids = list(ids)
        for _ in range(n):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[-n:]

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (special tokens parsed)."""
        data = text.encode("utf-8")
        buf = self.ffi.new("llama_token[]", len(data) + 16)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(data) + 16, add_special, True)
        return [buf[i] for i in range(n)]

    def close(self) -> None:
        if self.adapter is not None:
            self.lib.llama_adapter_lora_free(self.adapter)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
