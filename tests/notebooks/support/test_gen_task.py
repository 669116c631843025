"""The notebooks' generation task: prompt/answer batches put loss on the answers only, the eval set is
the 26 letters once, and exact_match_of scores what the model generates."""

from __future__ import annotations


from qlora_trainer.data.formats import IGNORE_INDEX
from support.gen_task import exact_match_of, sft_batch, upper_task


def test_upper_task_and_masked_batches():
    prompts, answers = upper_task()
    assert len(prompts) == 26 and prompts[10] == "Q: k=" and answers[10] == "K"
    p, a = upper_task(5, seed=1)
    assert p == upper_task(5, seed=1)[0] and all(x.upper() == y for x, y in zip((q[3] for q in p), a))
    b = sft_batch(["Q: k=", "Q: ab="], ["K", "B"])
    assert b["input_ids"].shape == (2, 9)                                   # 6 + len(" B\n"), right-padded
    row = b["labels"][0].tolist()
    assert row[:5] == [IGNORE_INDEX] * 5 and row[5:8] == list(b" K\n") and row[8] == IGNORE_INDEX
    assert b["attention_mask"][0].tolist() == [1] * 8 + [0]


def test_exact_match_of_scores_generations(tiny_model):
    res = exact_match_of(tiny_model.eval(), ["Q: k=", "Q: b="], ["K", "B"], extractor="first_line", max_new_tokens=3)
    assert res.n == 2 and res.exact_match == sum(r["correct"] for r in res.records) / 2
    assert all(r["correct"] == (r["predicted_answer"] == ans) for r, ans in zip(res.records, ["K", "B"]))
    assert res.new_tokens <= 6 and len(res.records) == 2
