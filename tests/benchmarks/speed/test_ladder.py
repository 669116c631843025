"""The ours/HF ladder (benchmarks.speed.ladder): what each optimisation is predicted to give, and
the tables in docs/speed-model.md are exactly what the model prints (no drift)."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.models.catalog import get_arch
from benchmarks.speed import ladder

DOC = Path(__file__).resolve().parents[3] / "docs" / "speed-model.md"


def test_docs_tables_are_the_models():
    text = DOC.read_text(encoding="utf-8")
    for model, seq in ladder.SHAPES:
        table = ladder.markdown(model, seq, "h100")
        assert table in text, f"docs/speed-model.md: regenerate with python -m benchmarks.speed.ladder\n{table}"


def test_each_rung_changes_what_it_claims():
    rows = ladder.ladder("llama-2-7b", 512, "h100")
    labels = [r[0] for r in rows]
    assert labels[:2] == ["HF stack", "ours before issue 16"] and len(rows) == 2 + len(ladder.RUNGS)
    base = rows[1][1]
    by = {rung.label: rows[2 + i] for i, rung in enumerate(ladder.RUNGS)}
    skip = by["recompute skips down_proj (`recompute_skips_base`)"][2]
    assert base.dequants - skip.dequants == get_arch("llama-2-7b").layers       # one dequant per layer
    auto = next(r for r in ladder.RUNGS if ladder.AUTO_CKPT in r.fields)
    alone = by[auto.label][2]
    assert alone.options.ckpt_layers == ladder.planned_layers("llama-2-7b", 512, "h100") == 0  # 80 GB: none
    assert alone.launches < base.launches and alone.seconds < base.seconds
    on = [rows[2 + i][1] for i, r in enumerate(ladder.RUNGS) if r.status == "on"]
    assert all(a.seconds >= b.seconds for a, b in zip([base] + on, on))   # default-on rungs never slow it down
    assert ladder.planned_layers("llama-2-7b", 4096, "rtx4090") > 0               # 24 GB at 4k: some recompute
