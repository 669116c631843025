"""The MoE load-peak benchmark's CPU dry run (tiny Mixtral and Qwen3-MoE, profiler-recorded allocations):
the streamed load never holds more than the NF4 model plus one expert's dense weights, the old path
(16-bit fused experts, quantized afterwards) holds all of them at once."""

from __future__ import annotations

import json

import torch

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


def test_suite_part_writes_synthetic_checkpoints_and_extrapolates(bench, tmp_path):
    """The suite's moe-load part in its dry run (tiny shapes, same code as on the GPU): both paths of
    both synthetic models, each row with its write time and the labelled full-depth extrapolation."""
    import time

    parts, suite, report = bench("parts"), bench("suite"), bench("suite_report")
    rows_path = tmp_path / "rows.jsonl"
    ctx = {"dry_run": True, "device": "cpu", "dtype": "float32", "seed": 0, "work": str(tmp_path / "w"),
           "deadline": time.time() + 120}
    parts.PARTS["moe-load"](parts.Part(ctx, rows_path, "moe-load"))
    rows = suite.read_rows(rows_path)
    assert [(r["arch"], r["path"]) for r in rows] == [(a, p) for a, _ in parts.MOE_LOAD for p in ("streamed", "old")]
    assert not list((tmp_path / "w").iterdir())  # each checkpoint removed after its loads
    for r in rows:
        assert r["kind"] == "moe_load" and r["part"] == "moe-load" and r["status"] == "ok", r
        assert r["synthetic"] == "tiny shapes" and r["layers"] == 2 and r["checkpoint_write_s"] >= 0
        assert r["transient"] == r["peak"] - r["kept"] and 0 < r["outside_layers"] < r["kept"]
        full = {"mixtral-8x7b": 32, "qwen3-30b-a3b": 48}[r["arch"]]
        assert r["extrapolated_layers"] == full and r["extrapolated_experts_dense"] == r["experts_dense"] * full // 2
        assert r["extrapolated_kept"] == r["outside_layers"] + full * r["per_layer_kept"] > r["kept"]
        assert r["extrapolated_peak"] == r["extrapolated_kept"] + r["extrapolated_transient"]
    by = {(r["arch"], r["path"]): r for r in rows}
    for arch, _ in parts.MOE_LOAD:
        new, old = by[(arch, "streamed")], by[(arch, "old")]
        assert new["extrapolated_transient"] == new["transient"]  # one expert at a time, whatever the depth
        assert old["extrapolated_transient"] >= old["experts_dense"] * new["extrapolated_layers"] // 2
        assert new["extrapolated_peak"] < old["extrapolated_peak"]
    doc = {"rows": rows}
    table = report.moe_load_markdown(doc)
    assert "extrapolated" in table[1] and len(table) == 5 + len(rows)


def test_old_path_out_of_memory_is_a_row(bench, tmp_path, monkeypatch):
    """An OOM on the old path is that row's status; the streamed row and the extrapolation still come."""
    mlp = bench("moe_load_peak")
    real = mlp.load

    def load(model_dir, *, streamed, **kw):
        if not streamed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.62 GiB")
        return real(model_dir, streamed=streamed, **kw)

    monkeypatch.setattr(mlp, "load", load)
    new, old = mlp.synthetic_rows("mixtral-8x7b", 2, tmp_path, device=torch.device("cpu"), dtype=torch.float32,
                                  tiny=True)
    assert new["status"] == "ok" and "extrapolated_peak" in new
    assert old["status"].startswith("out of memory") and old["peak"] is None and "extrapolated_peak" not in old
    assert old["extrapolated_experts_dense"] == 16 * old["experts_dense"]
