"""The CPU step benchmark's summary and page (no timing here: the benchmark itself is not a test)."""

from __future__ import annotations


def _row(system, step_s, extra, loss=5.0, status="ok"):
    return {"system": system, "status": status, "median_step_s": step_s, "step_seconds": [step_s, step_s + 1],
            "step_extra_rss_gb": extra, "step0_loss": loss}


def test_summary_takes_medians_over_processes_and_checks_step0_loss(bench):
    cs = bench("cpu_step")
    rows = [_row("hf", 10.0, 0.3), _row("qlora_trainer", 8.0, 0.1), _row("hf", 14.0, 0.2),
            _row("qlora_trainer", 6.0, 0.1), _row("hf", 12.0, 0.25), _row("qlora_trainer", 99.0, 0.1, status="error")]
    s = cs.summarize(rows)
    assert s["hf"]["median_step_s"] == 12.0 and s["hf"]["min_step_s"] == 10.0 and s["hf"]["repeats"] == 3
    assert s["qlora_trainer"]["median_step_s"] == 7.0 and s["qlora_trainer"]["repeats"] == 2  # errors left out
    assert s["ratio"] == 7.0 / 12.0 and abs(s["memory_ratio"] - 0.1 / 0.25) < 1e-12
    assert s["step0_loss_ok"] is True
    assert cs.summarize([_row("hf", 1.0, 0.1), _row("qlora_trainer", 1.0, 0.1, loss=5.1)])["step0_loss_ok"] is False
    doc = {"summary": s, "device": {"cpu": "x", "cpu_flags": ["avx2"], "load_before": [1.0], "load_after": [2.0],
                                    "date": "d", "versions": {"torch": "2"}},
           "spec": {"model": "cpu-1024", "seq_len": 256, "batch": 1, "warmup": 1, "steps": 3, "lora_r": 16},
           "threads": 1, "repeats": 3}
    md = cs.to_markdown(doc)
    assert "| hf | 12.000 | 10.000 | 0.250 |" in md and "**0.583**" in md and "x (avx2)" in md
