"""Where benchmark processes import from: an installed ``qlora_trainer`` and ``benchmarks``, never the
repo root.

Two hazards this module removes:

* On the GPU machine the project is not pip-installed, and a bare checkout on ``PYTHONPATH`` cannot
  import ``qlora_trainer.kernels`` (``kernels/`` installs under ``qlora_trainer`` only through
  pyproject's ``package-dir``). :func:`install_wheel` unpacks the project's pure-python wheel (built
  here by :func:`build_wheel`, or there from the source tree) into a *site* directory.
* The repo root on ``sys.path`` makes ``import kernels`` find our folder, and transformers /
  bitsandbytes probe for the Hugging Face ``kernels`` package by that name. Children therefore run
  with ``cwd`` = the site directory (holding ``qlora_trainer/`` and a ``benchmarks`` link only) and a
  ``PYTHONPATH`` from which the repo root is removed (:func:`child_env`).

stdlib only: the suite's parent process imports this before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE_ENV = "QLORA_BENCH_SITE"  # set by the suite once it has staged a site; children inherit it


def build_wheel(dest: str | Path, python: str = sys.executable) -> Path:
    """Build the project's wheel from the source tree into ``dest`` (no network, no build isolation:
    setuptools and wheel of ``python``'s environment); returns the wheel's path."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("qlora_trainer-*.whl"):
        old.unlink()
    proc = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(dest), str(REPO)], cwd=dest, capture_output=True, text=True)
    wheels = list(dest.glob("qlora_trainer-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"building the wheel failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    check_wheel(wheels[0])
    return wheels[0]


def check_wheel(wheel: Path) -> None:
    """Every module in the wheel exists in this checkout (setuptools builds in ``build/``, where a
    deleted module lingers) and ``qlora_trainer.kernels`` is in it."""
    with zipfile.ZipFile(wheel) as z:
        mods = [n for n in z.namelist() if n.endswith(".py")]
    src = {m: REPO / ("kernels/" + m.removeprefix("qlora_trainer/kernels/") if m.startswith("qlora_trainer/kernels/")
                      else m) for m in mods}
    stale = [m for m, f in src.items() if not f.is_file()]
    if stale or "qlora_trainer/kernels/__init__.py" not in src:
        raise RuntimeError(f"{wheel}: modules not in the source tree {stale[:5]} (remove build/ and rebuild) "
                           "or qlora_trainer.kernels missing")


def install_wheel(wheel: str | Path, site: str | Path) -> Path:
    """Unpack a pure-python wheel into ``site`` (what ``pip install --target`` does for one, with the
    stdlib alone) and link ``site/benchmarks`` to this checkout's benchmarks; returns ``site``."""
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        wheel_meta = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        if "Root-Is-Purelib: true" not in z.read(wheel_meta).decode():
            raise RuntimeError(f"{wheel}: not a pure-python wheel; install it with pip instead")
        z.extractall(site)
    link_benchmarks(site)
    return site


def link_benchmarks(site: str | Path) -> Path:
    """``site/benchmarks`` -> this checkout's ``benchmarks/`` (not installed: it is no package of ours)."""
    link = Path(site) / "benchmarks"
    if not link.exists():
        link.symlink_to(REPO / "benchmarks", target_is_directory=True)
    return Path(site)


def stage(work: str | Path, wheel: str | Path | None = None) -> Path:
    """A site under ``work`` with the project (``wheel``, else one built here from the source tree) and
    ``benchmarks``; exported as ``$QLORA_BENCH_SITE`` for every child of this process."""
    work = Path(work)
    wheel = Path(wheel) if wheel else build_wheel(work / "wheel")
    site = install_wheel(wheel, work / "site")
    os.environ[SITE_ENV] = str(site)
    return site


def site_dir() -> Path:
    """The staged site, or (run outside the suite, with qlora_trainer installed in the environment) a
    temporary directory holding only the ``benchmarks`` link."""
    if os.environ.get(SITE_ENV):
        return Path(os.environ[SITE_ENV])
    site = link_benchmarks(tempfile.mkdtemp(prefix="qlora-bench-path-"))
    os.environ[SITE_ENV] = str(site)
    return site


def assert_not_shadowed() -> None:
    """Raise when ``import kernels`` would find this checkout's ``kernels/`` (the repo root leaked onto
    sys.path): transformers and bitsandbytes would take it for the Hugging Face ``kernels`` package."""
    import importlib.util

    found = importlib.util.find_spec("kernels")
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    if origin is not None and origin.is_relative_to(REPO / "kernels"):
        raise RuntimeError(f"the repo root is on sys.path ({origin} is importable as `kernels`): run benchmark "
                           "processes through benchmarks.stage (cwd and PYTHONPATH without the repo root)")


_GROUPS: set[int] = set()  # process groups this process started and has not reaped yet


INTERRUPT_GRACE_S = 8.0  # after SIGINT: pytest finishes its report (junit, -rfE summary) in this time


def run_boxed(cmd: list[str], *, timeout: float, own_group: bool = False, interrupt_first: bool = False,
              **kw) -> int | None:
    """``subprocess.run`` inside a time box: the exit code, or None when the box ran out and the child
    was killed. ``own_group``: the child leads a new process group, killed as a whole (SIGTERM, then
    SIGKILL after 5 s), so its own children (pytest-xdist workers, a part's row processes) die too.
    ``interrupt_first``: the group gets SIGINT first and :data:`INTERRUPT_GRACE_S` to end (pytest
    then writes its junit report with every test finished so far)."""
    proc = subprocess.Popen(cmd, start_new_session=own_group, **kw)
    if own_group:
        _GROUPS.add(proc.pid)
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        if not own_group:
            proc.kill()
            proc.wait()
            return None
        end_group(proc, interrupt_first)
        return None
    finally:
        _GROUPS.discard(proc.pid)


def end_group(proc: subprocess.Popen, interrupt_first: bool = False) -> None:
    """End ``proc``'s process group: [SIGINT, a grace period,] SIGTERM, 5 s, SIGKILL; reaped."""
    for sig, grace in ([(signal.SIGINT, INTERRUPT_GRACE_S)] if interrupt_first else []) + [(signal.SIGTERM, 5.0)]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_groups_on_sigterm() -> None:
    """On SIGTERM (the suite ending a part's box), interrupt the process groups this process leads
    (SIGINT: a pytest writes its report), give them 3 s, kill them, then exit: a part's pytest and
    its workers must not outlive the part."""
    import time

    def handler(signum, frame):
        for sig in (signal.SIGINT, signal.SIGKILL):
            for pgid in list(_GROUPS):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            if sig == signal.SIGINT and _GROUPS:
                time.sleep(3.0)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _is_repo_root(p: str) -> bool:
    try:
        return Path(p or ".").resolve() == REPO
    except OSError:
        return False


def child_env(*first: str | None, smoke: bool = False) -> dict[str, str]:
    """Environment for a benchmark child: ``first`` paths (e.g. Unsloth's unpacked wheels), the site,
    then the inherited ``PYTHONPATH`` without the repo root; offline hub, no tokenizer threads.
    ``smoke``: one OpenMP thread (tiny CPU shapes on a shared machine)."""
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _is_repo_root(p)]
    env["PYTHONPATH"] = os.pathsep.join([p for p in first if p] + [str(site_dir())] + inherited)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def child_cwd() -> Path:
    """Working directory of every child: the site (on sys.path anyway), never the repo root."""
    return site_dir()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.stage DIR``: build the project's wheel into DIR (the GPU recipe's first
    step, run on this machine) and print its path."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.stage WHEEL_DIR", file=sys.stderr)
        return 2
    try:
        print(build_wheel(argv[0]))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
