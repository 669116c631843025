"""The MoE load-peak benchmark's CPU dry run (tiny Mixtral and Qwen3-MoE, profiler-recorded allocations):
the streamed load never holds more than the NF4 model plus one expert's dense weights, the old path
(16-bit fused experts, quantized afterwards) holds all of them at once."""

from __future__ import annotations

import json

from qlora_trainer.models.families import FAMILIES


def test_streamed_load_peaks_at_one_expert_above_the_nf4_model(bench, tmp_path):
    rows = bench("moe_load_peak").main(["--dry-run", "--json", str(tmp_path / "peak.json")])
    assert json.loads((tmp_path / "peak.json").read_text()) == rows
    by = {(r["model"], r["path"]): r for r in rows}
    assert {m for m, _ in by} == {"mixtral", "qwen3_moe"}
    for model in ("mixtral", "qwen3_moe"):
        new, old = by[(model, "streamed")], by[(model, "old")]
        assert new["status"] == old["status"] == "ok"
        extra = FAMILIES[model][1]
        one_expert = new["experts_dense"] // (2 * extra.get("num_local_experts", extra.get("num_experts", 0)))
        assert 0 < new["kept"] <= new["peak"] <= new["kept"] + one_expert
        assert old["peak"] - old["kept"] >= old["experts_dense"]  # all 16-bit experts at once
        assert new["peak"] < old["peak"]
