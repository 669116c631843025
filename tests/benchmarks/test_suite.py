"""``python -m benchmarks.suite --dry-run`` end to end, the way the GPU recipe runs it: the project's
wheel built here (``python -m benchmarks.stage``), then the suite started from the repo root by a
Python that cannot import ``qlora_trainer`` (a fresh venv seeing this venv's packages through a
``.pth`` line, so neither the editable finder nor the repo root is on its path). Every part's output
is checked, then the results page is generated from that JSON.

The dry run gets a generous ``--budget-s`` here so that a loaded box cannot time a part out; the
default dry-run budget (681 s) was measured on the 2-core box at load 8-12, where the run took 470-520 s before the moe-load part (~10 s there)
(each row process imports torch and transformers).
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ["correctness", "speed", "calibration", "moe-load", "70b", "long", "unsloth", "nf4_paths", "compile", "variants"]


def bare_python(root: Path) -> Path:
    """A venv whose only view of packages is this venv's site-packages, without their .pth hooks."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    pure = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(pure, "_parent_site.pth").write_text(site.getsitepackages()[0] + "\n")
    return py


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    py = bare_python(tmp / "bare")
    probe = subprocess.run([str(py), "-c", "import torch, transformers\nimport qlora_trainer"], cwd=tmp,
                           capture_output=True, text=True)
    assert "No module named 'qlora_trainer'" in probe.stderr  # the bare Python really lacks the project
    wheel = subprocess.run([sys.executable, "-m", "benchmarks.stage", str(tmp / "whl")], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.strip()
    out = tmp / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "OMP_NUM_THREADS": "1"}  # no PYTHONPATH, no TRITON_INTERPRET
    proc = subprocess.run([str(py), "-m", "benchmarks.suite", "--dry-run", "--out", str(out), "--wheel", wheel,
                           "--budget-s", "735"], cwd=REPO, env=env, capture_output=True, text=True, timeout=835)
    doc = json.loads((out / "suite.json").read_text())
    return proc, out, doc


def _rows(doc, kind, part=None):
    return [r for r in doc["rows"] if r.get("kind", "step") == kind and (part is None or r["part"] == part)]


@pytest.mark.timeout(935)  # the module fixture's dry run counts against its first user
def test_dry_run_writes_every_part(dry_run):
    proc, out, doc = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["junit-gpu-tests.xml", "junit-kernels-bf16.xml",
                                                     "junit-kernels-rest.xml", "suite.json", "suite.log", "suite.md",
                                                     "suite.rows.jsonl"], proc.stdout[-3000:]
    parts = doc["suite"]["parts"]
    assert [p["part"] for p in parts] == PARTS
    assert all(p["status"] == "done" and p["rows"] > 0 and 0 < p["used_s"] <= p["box_s"] for p in parts), parts
    assert doc["suite"]["dry_run"] and doc["suite"]["budget_s"] == 735
    d = doc["device"]
    assert {"gpu", "driver", "cuda", "python", "date", "command"} <= set(d) and d["gpu"] == "cpu"
    assert d["command"].startswith("python -m benchmarks.suite --dry-run") and d["versions"]["qlora-trainer"]
    persisted = [json.loads(ln) for ln in (out / "suite.rows.jsonl").read_text().splitlines()]
    assert [(r["part"], r.get("kind", "step")) for r in persisted] == [(r["part"], r.get("kind", "step")) for r in doc["rows"]]

    tests = _rows(doc, "kernel_tests")  # part 1: pytest over tests/kernels (two runs), kernels on == off, other tests
    assert [t["selection"] for t in tests] == ["kernels-bf16", "kernels-rest"]
    assert all(t["status"] == "ok" and t["passed"] >= 1 and t["failed"] == t["errors"] == 0 for t in tests), tests
    assert sum(t["passed"] for t in tests) >= 6 and "-v -rfE" in tests[0]["command"]
    other, = _rows(doc, "gpu_tests")
    assert other["status"] == "ok" and other["passed"] >= 1, other
    step, = _rows(doc, "kernel_step")
    c = step["checks"]["float32"]
    assert step["status"] == "ok" and c["ok"] and c["n_adapter_tensors"] > 0 and c["grad_rdiff_max"] <= 1e-4, step

    moe = _rows(doc, "moe_load")  # moe-load: both load paths of both synthetic MoEs, extrapolated to full depth
    assert [(r["arch"], r["path"], r["status"]) for r in moe] == [(a, p, "ok") for a in ("mixtral-8x7b", "qwen3-30b-a3b")
                                                                  for p in ("streamed", "old")], moe
    assert all(r["extrapolated_peak"] > r["peak"] for r in moe)

    rows = _rows(doc, "step", "speed")  # part 2: same weights, tokens, our estimate beside each
    speed = {r["system"]: r for r in rows}
    assert set(speed) == {"qlora_trainer", "hf", "hf-tuned"}
    for s in ("qlora_trainer", "hf", "hf-tuned"):
        assert speed[s]["status"] == "ok" and speed[s]["step0_loss_ok"] is True, speed[s]
        assert speed[s]["tokens_per_s"] > 0 and speed[s]["weights"] == "in_process"
    assert speed["qlora_trainer"]["est_allocated_gib"] > 0 and speed["hf"]["est_allocated_gib"] > 0
    assert "est_allocated_gib" not in speed["hf-tuned"]
    assert speed["qlora_trainer"]["speedup_vs_hf_tuned"] > 0
    variant, = _rows(doc, "step", "variants")
    assert variant["extra"] == {"performance": {"checkpoint_layers": "auto"}} and variant["status"] == "ok"
    assert variant["speedup_vs_hf"] > 0 and variant["step0_loss_ok"] is True
    unsloth, = _rows(doc, "step", "unsloth")
    assert unsloth["status"] == "skipped" and unsloth["reason"]
    assert all(r["status"] == "skipped" for r in _rows(doc, "step", "compile"))
    big = {r["system"]: r for r in _rows(doc, "step", "70b")}  # part 3
    assert set(big) == {"qlora_trainer", "hf"} and all(r["status"] == "ok" for r in big.values())
    long, *probes = _rows(doc, "long_context")  # part 4: pass/fail at the goal, tiled MLP (then probes)
    assert long["passed"] is True and long["goal_seq_len"] == 256 and long["extra"]["performance"]["mlp_chunk_tokens"] == 64
    assert long["est_allocated_gib"] > 0

    ctx, = _rows(doc, "cuda_context")  # part 5
    assert ctx["status"] == "skipped" and ctx["assumed_gib"] > 0
    cal = _rows(doc, "calibration")  # the rows measured before it in this call: the speed part's
    assert {(r["system"], r["seq_len"]) for r in cal} == {("qlora_trainer", 64), ("hf", 64)}
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert all(r["est_allocated_gib"] > 0 and r["measured_allocated_gib"] is None for r in cal)
    cli, = _rows(doc, "memory_cli")
    assert cli["status"] == "ok" and cli["estimate"]["allocated_gib"] >= 0 and not cli["measure"]
    paths = _rows(doc, "nf4_paths")  # part 6: each path checked against dequant, then timed
    assert len(paths) == 1 and all(set(r["fwd_ms"]) == {"dequant", "chunked", "chunked_32mib", "fused"} for r in paths)
    assert all(max(r["rel_err"].values()) < 1e-5 for r in paths)  # fp32 on the CPU
    win, = _rows(doc, "nf4_paths_winner")
    assert (win["model"], win["tokens"]) == ("tiny-64", 96) and win["winner"] in win["layer_ms"]

    md, log = (out / "suite.md").read_text(), (out / "suite.log").read_text()
    for head in ("## Time boxes", "## Kernel tests (kernels-bf16): ok", "## GPU tests (gpu-tests): ok",
                 "## One training step, kernels on vs off", "## MoE load peak",
                 "## Long context", "## CUDA context", "## Memory estimate vs measured", "| tiny-64 | 64 | 1 | hf-tuned | ok |",
                 "| tiny-64 | 64 | 1 | qlora_trainer [checkpoint_layers=auto] | ok |", "## NF4 matmul paths", "| tiny-64 | 96 | "):
        assert head in md
    assert d["command"] in md
    assert all(f"part {i + 1} {p}: done" in log for i, p in enumerate(PARTS)) and "PASSED" in log
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(900)
def test_page_is_generated_from_the_json(dry_run, bench, tmp_path):
    page = bench("page")
    _, out, doc = dry_run
    text = page.render(doc)
    assert "| tiny-64 | 64 | " in text and "hf-tuned tok/s" in text and "x unsloth speed" in text
    verdicts = {g: v for g, v, _ in page.goals(doc)}
    assert len(verdicts) == 7 and set(verdicts.values()) == {"not measured"}  # the CPU measures no GPU goal
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\n{page.BEGIN}\nold\n{page.END}\n\nrest\n")
    assert page.main([str(out / "suite.json"), "--readme", str(readme)]) == 0
    new = readme.read_text()
    assert new.endswith("\n\nrest\n") and "old" not in new and page.section(new) == page.render(
        doc | {"source": "suite.json"}, ["suite-tokens_per_s.png"])
    assert (tmp_path / "results" / "suite-tokens_per_s.png").stat().st_size > 1000  # drawn from the JSON
    assert page.main([str(out / "suite.json"), "--readme", str(readme), "--check"]) == 0
    # the committed README's section is what the generator makes of the committed results
    assert page.main(["--check"]) == 0


def test_budget_plan_and_parts_selection(bench, tmp_path):
    suite = bench("suite")
    a = suite.parse_args(["--out", "x", "--parts", "3", "speed", "--budget-s", "103"])
    assert a.parts == ["speed", "calibration"]  # always in order of value
    boxes = suite.plan_boxes(a.parts, a.budget_s, dry=False)
    assert sum(boxes.values()) == pytest.approx(100) and boxes["speed"] > 3 * boxes["calibration"]
    full = suite.plan_boxes(suite.NAMES, 540, dry=False)
    assert list(full) == suite.NAMES and sum(full.values()) == pytest.approx(540 - suite.RESERVE_S)
    first, _ = suite.choose_parts(suite.parse_args(["--out", "x", "--results", str(tmp_path)]))
    assert first[:2] == ["correctness", "speed"]  # the first call's parts fit its default budget unscaled
    assert sum(s for n, s, _ in suite.PLAN if n in first) <= suite.GPU_BUDGET_S - suite.RESERVE_S
    assert suite.GPU_BUDGET_S <= 470 and all(s <= 540 for _, s, _ in suite.PLAN)  # one part fits one command
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x", "--parts", "11"])


def test_repo_root_on_sys_path_is_refused(bench, monkeypatch, tmp_path):
    stage = bench("stage")
    monkeypatch.setenv(stage.SITE_ENV, str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:/keep")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not stage._is_repo_root(p)])  # `python -m pytest` adds cwd
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    stage.assert_not_shadowed()
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(RuntimeError, match="repo root is on sys.path"):
        stage.assert_not_shadowed()
    env = stage.child_env("/first")
    assert env["PYTHONPATH"].split(":") == ["/first", str(tmp_path), "/keep"]  # the repo root is dropped
    assert stage.child_cwd() == tmp_path


def test_a_time_box_kills_the_whole_process_group(bench, tmp_path):
    """A part killed at the end of its box takes its children (row processes, pytest workers) along."""
    import os
    import time

    stage = bench("stage")
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    t0 = time.time()
    assert stage.run_boxed([sys.executable, "-c", code], timeout=5, own_group=True) is None
    assert time.time() - t0 < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # reparented to init, reaped there
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived its group's time box")
    assert stage.run_boxed([sys.executable, "-c", "raise SystemExit(4)"], timeout=30) == 4
