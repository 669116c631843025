"""The suite across several GPU calls: the planner picks the most valuable parts the committed results
have not measured; rows reach the output folder as each ends; a pytest cut by its time box still
leaves its per-test results."""

from __future__ import annotations

import json
import sys
import time

import pytest


def _suite_json(path, parts, dry=False):
    path.write_text(json.dumps({"suite": {"dry_run": dry, "parts": [{"part": p, "status": s} for p, s in parts]},
                                "rows": []}))


FIRST = ["correctness", "speed", "calibration"]  # 450 s of 467: moe-load (80) does not fit beside


def test_first_call_measures_the_most_valuable_parts_that_fit(bench, tmp_path):
    suite = bench("suite")
    a = suite.parse_args(["--out", "x", "--results", str(tmp_path)])
    parts, measured = suite.choose_parts(a)
    assert parts == FIRST and measured == {}
    boxes = suite.plan_boxes(parts, suite.GPU_BUDGET_S, dry=False)
    assert sum(boxes.values()) == pytest.approx(suite.GPU_BUDGET_S - suite.RESERVE_S) and suite.GPU_BUDGET_S <= 470


def test_later_calls_continue_where_the_committed_results_stop(bench, tmp_path):
    suite, planner = bench("suite"), bench("planner")
    _suite_json(tmp_path / "suite-1.json", [(p, "done") for p in FIRST])
    _suite_json(tmp_path / "suite-dry.json", [("70b", "done"), ("long", "done")], dry=True)  # a dry run measures nothing
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "bench-old.json").write_text(json.dumps({"rows": []}))  # a runner file, no suite section
    assert planner.measured_parts(tmp_path) == {p: "suite-1.json" for p in FIRST}
    parts, _ = suite.choose_parts(suite.parse_args(["--out", "x", "--results", str(tmp_path)]))
    assert parts == ["moe-load", "70b", "long", "unsloth"]  # 445 s of 467: nf4_paths (35) does not fit
    _suite_json(tmp_path / "suite-2.json", [("moe-load", "done"), ("70b", "done"), ("long", "timeout"),
                                            ("unsloth", "done")])
    parts, _ = suite.choose_parts(suite.parse_args(["--out", "x", "--results", str(tmp_path)]))
    assert parts == ["long", "nf4_paths", "compile", "variants"]  # a part that timed out is measured again
    plan = [(n, s) for n, s, _ in suite.PLAN]
    assert planner.next_parts(plan, {n for n, _ in plan}, 467) == FIRST  # all done: start over
    assert planner.next_parts(plan, set(), 10) == ["correctness"]  # at least one
    a = suite.parse_args(["--out", "x", "--results", str(tmp_path), "--parts", "compile", "3"])
    assert suite.choose_parts(a) == (["calibration", "compile"], {})  # --parts wins, in order of value


def test_rows_reach_the_output_folder_as_each_ends(bench, tmp_path):
    parts, suite = bench("parts"), bench("suite")
    rows = tmp_path / "out" / suite.ROWS
    rows.parent.mkdir()
    p = parts.Part({"dry_run": True, "work": str(tmp_path / "w"), "deadline": time.time() + 60}, rows, "speed")
    p.emit({"kind": "step", "status": "ok", "n": 1})
    assert suite.read_rows(rows) == [{"kind": "step", "status": "ok", "n": 1, "part": "speed"}]
    p.emit({"kind": "step", "status": "ok", "n": 2})
    with open(rows, "a") as f:
        f.write('{"kind": "step", "cut sho')  # a row cut by a kill mid-write
    assert [r["n"] for r in suite.read_rows(rows)] == [1, 2]


def test_a_killed_pytest_keeps_its_per_test_results(bench, tmp_path):
    """The box ends in the middle of a test: SIGINT first, so pytest writes its junit report with the
    tests finished so far (a SIGTERM/SIGKILL wrote none)."""
    stage, parts = bench("stage"), bench("parts")
    (tmp_path / "test_x.py").write_text(
        "import time\n\ndef test_fast():\n    assert 1\n\ndef test_fails():\n    assert 0, 'wrong'\n\n"
        "def test_hangs():\n    time.sleep(300)\n")
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "test_x.py"), "-v", "-rfE", "-p", "no:cacheprovider",
           "-c", str(tmp_path / "none.ini"), "--rootdir", str(tmp_path), f"--junitxml={junit}"]
    (tmp_path / "none.ini").write_text("[pytest]\n")
    t0 = time.time()
    assert stage.run_boxed(cmd, timeout=20, own_group=True, interrupt_first=True, cwd=tmp_path) is None
    assert time.time() - t0 < 20 + stage.INTERRUPT_GRACE_S + 10
    got = parts.junit_summary(junit)
    assert got["passed"] == 1 and got["failed"] == 1, got
    assert got["failures"] == ["test_x::test_fails: AssertionError: wrong"]
