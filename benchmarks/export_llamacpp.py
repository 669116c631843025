"""Export checked by llama.cpp itself, on the CPU: ``python benchmarks/export_llamacpp.py``.

``--setup DIR`` makes the runtime directory once (no llama.cpp build, no compiler beyond a one-line C
shim): downloads the ``llama-cpp-cffi`` 0.4.42 wheel (a prebuilt llama.cpp of April 2025 with a CPU
cffi extension), unpacks only that extension, installs ``cffi`` beside it and, where the system's
libstdc++ predates GCC 14, compiles ``libcxa_shim.so`` for the one symbol it lacks. Then
``QLORA_LLAMA_CPP=DIR`` runs the ``slow`` tests in ``tests/export/test_llamacpp.py`` (merged GGUF in
f32/f16/bf16/q8_0 for Llama, Mistral and Qwen2, the GGUF LoRA adapter on the base: logits, greedy
tokens and tokenization against transformers), which this script runs and whose lines it prints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = "llama-cpp-cffi==0.4.42"
SHIM = "#include <stdlib.h>\nvoid __cxa_call_terminate(void *e) { (void)e; abort(); }\n"


def setup(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.startswith("llama/_llama_cpp_cpu"))
            (target / Path(member).name).write_bytes(z.read(member))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), "cffi", "pycparser"], check=True)
    src = target / "shim.c"
    src.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(target / "libcxa_shim.so"), str(src)], check=True)
    print(f"llama.cpp runtime in {target}; run with QLORA_LLAMA_CPP={target}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", type=Path, metavar="DIR", help="make the runtime directory first")
    args = p.parse_args()
    if args.setup:
        setup(args.setup)
        os.environ["QLORA_LLAMA_CPP"] = str(args.setup.resolve())
    if not os.environ.get("QLORA_LLAMA_CPP"):
        p.error("set QLORA_LLAMA_CPP=DIR or pass --setup DIR")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/export/test_llamacpp.py", "-m", "slow", "-q", "-s",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "|Δlogit|" in line or " passed" in line or " failed" in line or "skipped" in line or "Error" in line:
            print(line)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
