"""causal_lm_loss matches transformers' own shifted cross-entropy, without materialising fp32 logits."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.models.loss import causal_lm_loss


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 10:] = -100
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels[1, 14:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_matches_hf_loss(tiny_model, chunk_size):
    batch = _batch()
    with torch.no_grad():
        ref = tiny_model(**batch).loss  # mean over shifted non-ignored labels
    loss_sum, n = causal_lm_loss(tiny_model, batch, chunk_size=chunk_size)
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-5)


def test_adapted_output_layer_fallback(tiny_model):
    """An output layer that is not a plain Linear (here wrapped) goes through the chunked module path."""
    batch = _batch()
    with torch.no_grad():
        ref = tiny_model(**batch).loss
    tiny_model.set_output_embeddings(torch.nn.Sequential(tiny_model.lm_head))
    assert isinstance(tiny_model.get_output_embeddings(), torch.nn.Sequential)
    loss_sum, n = causal_lm_loss(tiny_model, batch, chunk_size=5)
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-5)
