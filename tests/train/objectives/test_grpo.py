"""GRPO: group-normalised advantages and the loss on a fixed batch of completions and rewards equal
TRL's (``GRPOTrainer._compute_loss`` run unbound on a stand-in, its log-probs from full logits of the
same model) within 1e-5 for each loss normalisation, with clipping and the KL term active."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qlora_trainer.train.objectives.grpo import GRPO, group_advantages

pytest.importorskip("trl")


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0, 0.0, 3.0])
    adv = group_advantages(r, 4)
    g = r.view(-1, 4)
    want = (r - g.mean(1).repeat_interleave(4)) / (nanstd(g, dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(adv, want)
    same = group_advantages(torch.ones(4), 4)
    assert torch.equal(same, torch.zeros(4))  # no signal in a group whose rewards are all equal
    torch.testing.assert_close(group_advantages(r, 4, "none"), r - g.mean(1).repeat_interleave(4))


def _rollout(G: int = 3, n_prompts: int = 2, seed: int = 5):
    """Left-padded prompts, right-padded completions, as TRL lays them out."""
    g = torch.Generator().manual_seed(seed)
    N, P, C = G * n_prompts, 5, 6
    prompt_ids = torch.randint(3, 260, (N, P), generator=g)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    prompt_mask[::2, :2] = 0
    completion_ids = torch.randint(3, 260, (N, C), generator=g)
    completion_mask = torch.ones(N, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[4, 5:] = 0
    rewards = torch.rand(N, generator=g)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, group_advantages(rewards, G), g


def _full_logps(model, input_ids, attention_mask, keep):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logp = F.log_softmax(logits[:, -keep - 1:-1], -1)
    lp = logp.gather(-1, input_ids[:, -keep:, None])[..., 0]
    return lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(adapted_model, loss_type):
    from trl.trainer.grpo_trainer import GRPOTrainer

    from qlora_trainer.lora.multi import disable_adapters

    prompt_ids, prompt_mask, completion_ids, completion_mask, adv, g = _rollout()
    C, P = completion_ids.shape[1], prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        now, _ = _full_logps(adapted_model, input_ids, attention, C)
        with disable_adapters(adapted_model):
            ref, _ = _full_logps(adapted_model, input_ids, attention, C)
    old = now + 0.3 * torch.randn(now.shape, generator=g)  # off-policy enough that both clips bite
    beta, max_len = 0.04, 8
    me = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, ids, mask, keep, **_: (*_full_logps(model, ids, mask, keep),
                                                                                None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                    sync_gradients=True))
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    want = GRPOTrainer._compute_loss(me, adapted_model, inputs)

    pad = torch.zeros(input_ids.shape[0], P - 1)
    labels = input_ids.masked_fill(torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1) == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "advantages": adv,
             "old_logps": torch.cat([pad, old], 1), "ref_logps": torch.cat([pad, ref], 1)}
    obj = GRPO(beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=max_len)
    terms, metrics = obj.loss(adapted_model, batch, chunk_size=7)
    w = obj.weights(batch)
    ours = sum(t / w[k] for k, t in terms.items())
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    trl_m = {k: v[-1] for k, v in me._metrics["train"].items()}
    assert trl_m["clip_ratio/low_mean"] > 0 and trl_m["clip_ratio/high_mean"] > 0
    for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert float(metrics[k]) / w[obj.metric_weights[k]] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-6), k
