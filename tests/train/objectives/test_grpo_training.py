"""GRPO end to end on the CPU: reward functions load by name, the reward rises on a task a tiny
model can learn, and a stopped run resumes exactly (rollouts are seeded by step)."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.errors import ConfigError
from qlora_trainer.train.objectives.rewards import gsm8k_exact, gsm8k_format, load_reward

REWARD = '''
def share_of_a(prompts, completions, **columns):
    assert len(columns["answer"]) == len(completions)  # the data's other columns, one per completion
    return [c.count("a") / max(len(c), 1) for c in completions]
'''


def test_builtin_rewards_and_loading(tmp_path):
    assert gsm8k_exact(["q"] * 3, ["so 5 #### 72", "#### 7", "it is 72"], answer=["#### 72"] * 3) == [1.0, 0.0, 1.0]
    assert gsm8k_format(["q"] * 2, ["a\n#### 12", "12"]) == [1.0, 0.0]
    assert load_reward("gsm8k_exact") is gsm8k_exact
    assert load_reward("qlora_trainer.train.objectives.rewards:gsm8k_format") is gsm8k_format
    (tmp_path / "r.py").write_text(REWARD)
    fn = load_reward(f"{tmp_path / 'r.py'}:share_of_a")
    assert fn(prompts=["p"], completions=["aab"], answer=["x"]) == [2 / 3]
    for bad, msg in (("nothing", "is not a built-in"), (f"{tmp_path / 'x.py'}:f", "not found"),
                     (f"{tmp_path / 'r.py'}:nope", "has no function 'nope'"), ("no_such_mod:f", "cannot import")):
        with pytest.raises(ConfigError, match=msg):
            load_reward(bad)


def _cfg(tmp_path, name: str, steps: int):
    from qlora_trainer.config import config_from_dict

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}:", "answer": w}) + "\n" for w in ("yes", "no", "ok", "hi")))
    (tmp_path / "r.py").write_text(REWARD)
    return config_from_dict({
        "model": {"name_or_path": "random:tiny", "quantization": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]},
        "data": {"path": str(data), "format": "prompt_only", "seq_len": 32},
        "train": {"max_steps": steps, "lr": 1e-2, "batch_size": 2, "grad_accum": 1, "seed": 0, "device": "cpu",
                  "objective": "grpo", "optimizer": "adamw"},
        "grpo": {"num_generations": 4, "max_completion_length": 12, "beta": 0.04,
                 "rewards": [f"{tmp_path / 'r.py'}:share_of_a"]},
        "output": {"progress_bar": False, "keep_last": 5}, "output_dir": str(tmp_path / name)}).validate()


def _rows(cfg) -> list[dict]:
    return [r for r in map(json.loads, open(cfg.output_dir + "/metrics.jsonl").read().splitlines()) if "loss" in r]


def test_reward_rises(tmp_path):
    from qlora_trainer.train import train

    cfg = _cfg(tmp_path, "run", 16)
    train(cfg)
    rewards = [r["rewards/share_of_a/mean"] for r in _rows(cfg)]
    assert {"kl", "completion_length", "reward_std", "clip_ratio/region_mean"} <= set(_rows(cfg)[-1])
    assert sum(rewards[-4:]) / 4 > 0.3 > sum(rewards[:4]) / 4


def test_stop_and_resume_is_exact(tmp_path):
    from qlora_trainer.train import train

    full = train(_cfg(tmp_path, "full", 4))
    part = _cfg(tmp_path, "part", 4)
    first = train(part, stop_after=2)
    part.resume = "auto"
    rest = train(part)
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    assert [r["reward"] for r in _rows(part)] == pytest.approx([r["reward"] for r in _rows(_cfg(tmp_path, "full", 4))])
