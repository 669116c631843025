"""TRL as the oracle: on the same tiny NF4 model, LoRA adapter and batch, our losses and reported
rewards / margins / accuracies equal TRL's own code within 1e-5 (fp32).

TRL's methods run unbound on a stand-in ``self`` holding just the settings they read; its model
calls get full-logit log-probs from the same model (TRL's fused-LM-head output fields computed from
``log_softmax`` of the whole logits), the reference = the same model with the adapter off. Our side
runs the chunked per-token log-prob path."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qlora_trainer.lora.multi import disable_adapters
from qlora_trainer.train.objectives import DPO, IPO, KTO, ORPO, SimPO

pytest.importorskip("trl")
TOL = dict(rtol=1e-5, atol=1e-5)


class Fused:
    """``model(..., labels=, fused_lm_head=True)`` as TRL calls it: per-token fields of the
    next-token distribution, zero where the label is -100."""

    def __init__(self, model, adapter: bool = True):
        self.model, self.adapter = model, adapter

    def __call__(self, input_ids, attention_mask=None, labels=None, use_cache=False, fused_lm_head=True, **_):
        def run():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()

        if self.adapter:
            logits = run()
        else:
            with disable_adapters(self.model):
                logits = run()
        z, y = logits[:, :-1], labels[:, 1:]
        valid = y != -100
        logp = F.log_softmax(z, -1)
        lp = logp.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0] * valid
        ent = -(logp.exp() * logp).sum(-1) * valid
        return SimpleNamespace(log_probs=lp, entropy=ent.detach(), mean_logits=(z.mean(-1) * valid).detach(),
                               is_top1=(z.argmax(-1) == y) & valid, log_sum_sq_probs=None)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t,
                           unwrap_model=lambda m: m)


def _trainer(model, **settings):
    stand_in = torch.nn.Module()  # what TRL asks of self.model: train mode, not PEFT, no checkpointing
    stand_in.is_gradient_checkpointing = False
    return SimpleNamespace(model=stand_in,
                           accelerator=_accelerator(), ref_model=Fused(model, adapter=False), aux_loss_enabled=False,
                           precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, **settings)


def _ours(objective, model, batch):
    terms, metrics = objective.loss(model, batch, chunk_size=5)
    w = objective.weights(batch)
    loss = sum(t / w[k] for k, t in terms.items())
    means = {k: float(v) / w[objective.metric_weights[k]] for k, v in metrics.items()}
    return loss, objective.finish_metrics(means)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_dpo_ipo_match_trl(adapted_model, pair_batch, kind):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta = 0.2
    completion = (pair_batch["labels"] != -100).long()
    trl_inputs = {"input_ids": pair_batch["input_ids"], "attention_mask": pair_batch["attention_mask"],
                  "completion_mask": completion}
    me = _trainer(adapted_model, beta=beta, loss_types=["ipo" if kind == "ipo" else "sigmoid"], loss_weights=[1.0],
                  ld_alpha=None, f_divergence_type="reverse_kl", label_smoothing=0.0, use_weighting=False)
    ref_loss = DPOTrainer._compute_loss(me, Fused(adapted_model), trl_inputs, return_outputs=False)
    ours, metrics = _ours((IPO if kind == "ipo" else DPO)(beta=beta), adapted_model, pair_batch)
    torch.testing.assert_close(ours, ref_loss, **TOL)
    trl_m = {k: v[-1] for k, v in me._metrics["train"].items()}
    assert trl_m["rewards/margins"] != 0  # the adapter moves the policy off the reference
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert metrics[k] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-5), k


def test_dpo_gradient_matches_trl(adapted_model, pair_batch):
    """The adapter gradients of our chunked DPO loss equal those of TRL's full-logit loss."""
    from trl.trainer.dpo_trainer import DPOTrainer

    completion = (pair_batch["labels"] != -100).long()
    me = _trainer(adapted_model, beta=0.1, loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None,
                  f_divergence_type="reverse_kl", label_smoothing=0.0, use_weighting=False)
    params = [p for n, p in adapted_model.named_parameters() if "lora_" in n]
    ref = DPOTrainer._compute_loss(me, Fused(adapted_model), {**{k: pair_batch[k] for k in ("input_ids",
                                   "attention_mask")}, "completion_mask": completion}, return_outputs=False)
    g_ref = torch.autograd.grad(ref, params)
    ours, _ = _ours(DPO(beta=0.1), adapted_model, pair_batch)
    g_ours = torch.autograd.grad(ours, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _split(batch):
    out = {}
    for side, half in zip(("chosen", "rejected"), range(2)):
        for k, v in (("input_ids", batch["input_ids"]), ("attention_mask", batch["attention_mask"]),
                     ("labels", batch["labels"])):
            out[f"{side}_{k}"] = v.chunk(2)[half]
    return out


def test_orpo_matches_trl(adapted_model, pair_batch):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.25
    me = _trainer(adapted_model, beta=beta, is_encoder_decoder=False, padding_value=0)
    me.concatenated_inputs = ORPOTrainer.concatenated_inputs
    me.get_batch_logps = ORPOTrainer.get_batch_logps
    me.concatenated_forward = lambda model, batch: ORPOTrainer.concatenated_forward(me, model, batch)
    me.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(me, c, r)
    ref_loss, trl_m = ORPOTrainer.get_batch_loss_metrics(me, adapted_model, _split(pair_batch))
    ours, metrics = _ours(ORPO(beta=beta), adapted_model, pair_batch)
    torch.testing.assert_close(ours, ref_loss, **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[k] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-5), k


@pytest.mark.parametrize("alpha,smoothing", [(0.0, 0.0), (0.5, 0.1)])
def test_simpo_matches_trl_cpo_simpo(adapted_model, pair_batch, alpha, smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, gamma = 2.0, 0.5
    me = _trainer(adapted_model, beta=beta, is_encoder_decoder=False, pad_token_id=0, loss_type="simpo",
                  simpo_gamma=gamma, cpo_alpha=alpha, label_smoothing=smoothing, alpha=0.0)
    me.concatenated_inputs = CPOTrainer.concatenated_inputs
    me.get_batch_logps = CPOTrainer.get_batch_logps
    me.concatenated_forward = lambda model, batch: CPOTrainer.concatenated_forward(me, model, batch)
    me.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(me, c, r)
    ref_loss, trl_m = CPOTrainer.get_batch_loss_metrics(me, adapted_model, _split(pair_batch))
    ours, metrics = _ours(SimPO(beta=beta, gamma=gamma, alpha=alpha, label_smoothing=smoothing), adapted_model,
                          pair_batch)
    torch.testing.assert_close(ours, ref_loss, **TOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert metrics[k] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-5), k


def test_kto_matches_trl(adapted_model, pair_batch):
    """KTO on 6 unpaired examples (the pair batch's rows, labels mixed), KL rows = prompt i with the
    completion of row i-1, built by our collate."""
    from qlora_trainer.data.preference import unpaired_collate
    from trl.trainer.kto_trainer import KTOTrainer

    samples = []
    for i in range(pair_batch["input_ids"].shape[0]):
        n = int(pair_batch["attention_mask"][i].sum())
        ids, lab = pair_batch["input_ids"][i, :n].tolist(), pair_batch["labels"][i, :n].tolist()
        first = next(j for j, y in enumerate(lab) if y != -100)
        samples.append({"prompt_ids": ids[:first], "completion_ids": ids[first:], "label": i % 3 != 1})
    batch = unpaired_collate(samples, pad_id=0)
    beta = 0.3
    trl_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long(), "label": batch["label"].bool(),
                  "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
                  "KL_completion_mask": (batch["kl_labels"] != -100).long()}
    me = _trainer(adapted_model, beta=beta, calculate_KL=True, loss_type="kto", desirable_weight=1.0,
                  undesirable_weight=1.5)
    me._compute_kl_logps = lambda model, b: KTOTrainer._compute_kl_logps(me, model, b)
    ref_loss = KTOTrainer._compute_loss(me, Fused(adapted_model), trl_inputs, return_outputs=False)
    ours, metrics = _ours(KTO(beta=beta, undesirable_weight=1.5), adapted_model, batch)
    torch.testing.assert_close(ours, ref_loss, **TOL)
    trl_m = {k: v[-1] for k, v in me._metrics["train"].items()}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert metrics[k] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-5), k
