"""Fitted constants reproduce what they were fitted to; leave-one-out on the four HF-stack rows."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.models.catalog import CATALOG
from benchmarks.speed import calibrate as cal
from benchmarks.speed.devices import Efficiency
from benchmarks.speed.recipes import StepOptions
from benchmarks.speed.report import predict

# docs/speed-model.md quotes these (error of the prediction for the held-out row)
LOO = {"llama-3-8b": -0.132, "llama-2-7b": 0.327, "llama-2-70b": -0.192, "llama-3-70b": -0.016}


def test_components_are_reproduced():
    eff = cal.fit_components(Efficiency())
    for (model, seq), meas in cal.COMPONENTS.items():
        p = predict(CATALOG[model], StepOptions(system="hf", seq_len=seq), "h100", eff)
        gemm = sum(g for name, (g, _, _) in p.ops.items() if name.startswith("base"))
        deq = sum(g for name, (g, _, _) in p.ops.items() if name.startswith("dequant"))
        assert gemm == pytest.approx(meas["gemm"], rel=0.03)      # one factor, two shapes
        assert deq == pytest.approx(meas["dequant"], rel=1e-6)    # two unknowns, two equations
    assert 0.6 < eff.gemm < 0.8 and 0.3 < eff.dequant_bnb < 0.5 and 20 < eff.bnb_call_us < 40


def test_leave_one_out_table():
    """Fit launch_us on three rows, predict the fourth. 8B/2048 and Llama-3-70B come within 15%;
    7B/512 and Llama-2-70B do not: measured, 7B/512 takes longer per step (0.755 s) than 8B/2048
    (0.565 s) with the same layer count and a smaller shape, which no model monotone in the shape
    reproduces, and Llama-2-70B and Llama-3-70B (same layers, vocab 32k vs 128k) differ by 0.28 s,
    far more than the larger lm_head and loss cost."""
    rows = cal.leave_one_out()
    for r in rows:
        assert r["error"] == pytest.approx(LOO[r["model"]], abs=0.01), r
    within = {r["model"] for r in rows if abs(r["error"]) < 0.15}
    assert within == {"llama-3-8b", "llama-3-70b"}


def test_monotone_model_cannot_fit_7b_and_8b_together():
    s8, s7 = cal.STEPS[0].step_s, cal.STEPS[1].step_s
    assert s7 > s8                                                  # the measurements
    for eff in (Efficiency(), Efficiency(launch_us=5.0), Efficiency(launch_us=200.0, mem=0.2)):
        p8 = predict(CATALOG["llama-3-8b"], StepOptions(system="hf", seq_len=2048), "h100", eff)
        p7 = predict(CATALOG["llama-2-7b"], StepOptions(system="hf", seq_len=512), "h100", eff)
        assert p7.seconds <= p8.seconds                             # any setting of the model


def test_results_reader(tmp_path):
    doc = {"device": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": [
        {"model": "llama-3-8b", "seq_len": 2048, "batch": 1, "system": "hf", "status": "ok", "tokens_per_s": 2000.0},
        {"model": "llama-3-8b", "seq_len": 2048, "batch": 1, "system": "qlora_trainer", "status": "ok",
         "tokens_per_s": 7000.0},
        {"model": "llama-3-8b", "seq_len": 2048, "batch": 1, "system": "unsloth", "status": "ok", "tokens_per_s": 1.0},
        {"model": "llama-2-7b", "seq_len": 512, "batch": 1, "system": "hf", "status": "error"},
        {"model": "llama-3-8b", "seq_len": 2048, "batch": 1, "system": "qlora_trainer", "status": "ok",  # variants:
         "tokens_per_s": 9000.0, "extra": {"train": {"compile": "reduce-overhead"}}},                 # not the
        {"model": "llama-3-8b", "seq_len": 2048, "batch": 1, "system": "qlora_trainer", "status": "ok",  # modelled
         "tokens_per_s": 8000.0, "cap_gb": 24.0, "extra": {"model": {"checkpoint_layers": "auto"}}},  # recipe
        {"kind": "max_context", "model": "llama-3-8b", "system": "hf", "status": "ok", "max_seq_len": 7168}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "broken.json").write_text("{")
    rows = cal.load_results(tmp_path)
    assert [(r.system, r.tokens_per_s, r.gpu) for r in rows] == [("hf", 2000.0, "h100"), ("ours", 7000.0, "h100")]
    assert cal.load_results(tmp_path / "missing") == []
    refit = cal.fit(cal.STEPS + tuple(rows))
    assert refit.launch_us != cal.default_efficiency().launch_us   # the HF row moves the HF fit
    assert refit.ours_launch_us is not None and cal.default_efficiency().ours_launch_us is None
    ours = predict(CATALOG["llama-3-8b"], StepOptions(seq_len=2048), "h100", refit)
    assert ours.tokens_per_s == pytest.approx(7000.0, rel=0.06)     # one row, one parameter
