"""Loss terms and how they combine, checked against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids, tiny_config

from pretrain.config import Config, DataConfig, ObjectiveConfig
from pretrain.data.masking import IGNORE_INDEX
from pretrain.model import SharedTransformer
from pretrain.objectives import clm_loss, compute_loss, mlm_loss, model_inputs

pytestmark = pytest.mark.unit


def mlm_batch(seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(batch=B, length=T, seed=seed)
    labels = torch.full((B, T), IGNORE_INDEX)
    chosen = torch.rand(B, T, generator=g) < 0.3
    labels[chosen] = ids[chosen]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "mlm_labels": labels,
        "sop_labels": torch.tensor([0, 1, 1])[:B],
    }


def run_config(model_cfg, **objective):
    data = DataConfig(seq_length=model_cfg.max_position_embeddings)
    return Config(model=model_cfg, data=data, objective=ObjectiveConfig(**objective))


def test_mlm_loss_is_cross_entropy_at_masked_positions_only():
    torch.manual_seed(0)
    model = SharedTransformer(tiny_config("albert")).eval()
    batch = mlm_batch()
    full = model(batch["input_ids"]).logits
    selected = model(**model_inputs(batch)).logits
    loss, metrics = mlm_loss(selected, batch["mlm_labels"])
    labels = batch["mlm_labels"].flatten()
    expected = F.cross_entropy(full.flatten(0, 1), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["mlm_tokens"].item() == (batch["mlm_labels"] != IGNORE_INDEX).sum().item()


def test_mlm_loss_with_nothing_masked_is_zero_not_nan():
    logits = torch.zeros(0, 97)
    loss, metrics = mlm_loss(logits, torch.full((2, 5), IGNORE_INDEX))
    assert loss.item() == 0.0 and metrics["mlm_acc"].item() == 0.0


def test_clm_loss_ignores_padding_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[1, 4:] = IGNORE_INDEX
    loss, metrics = clm_loss(logits, labels)
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))
    assert metrics["clm_tokens"].item() == 10


@pytest.mark.parametrize(("mlm_weight", "sop_weight"), [(1.0, 1.0), (1.0, 0.0), (0.5, 2.0)])
def test_albert_total_weights_mlm_and_sop(mlm_weight, sop_weight):
    torch.manual_seed(0)
    model_cfg = tiny_config("albert")
    model = SharedTransformer(model_cfg).eval()
    batch = mlm_batch()
    output = model(**model_inputs(batch))
    cfg = run_config(model_cfg, mlm_weight=mlm_weight, sop_weight=sop_weight)
    total, metrics = compute_loss(output, batch, cfg)
    sop = F.cross_entropy(output.sop_logits, batch["sop_labels"])
    expected = mlm_weight * metrics["mlm_loss"] + sop_weight * sop
    torch.testing.assert_close(total, expected)
    assert {"mlm_loss", "mlm_acc", "sop_loss", "sop_acc", "loss"} <= set(metrics)


def test_llama_total_is_causal_lm():
    torch.manual_seed(0)
    model_cfg = tiny_config("llama")
    model = SharedTransformer(model_cfg).eval()
    ids = random_ids(length=13)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    output = model(**model_inputs(batch))
    total, metrics = compute_loss(output, batch, run_config(model_cfg, clm_weight=2.0))
    expected = F.cross_entropy(output.logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(total, 2.0 * expected)
    assert "mlm_loss" not in metrics and "sop_loss" not in metrics


def test_ponder_cost_and_tie_penalty_enter_with_their_weights():
    torch.manual_seed(0)
    ut = tiny_config("albert", sharing={"strategy": "all"}, universal={"enabled": True})
    model = SharedTransformer(ut).eval()
    batch = mlm_batch()
    output = model(**model_inputs(batch))
    total, metrics = compute_loss(output, batch, run_config(ut, sop_weight=0.0))
    torch.testing.assert_close(total, metrics["mlm_loss"] + 0.01 * output.ponder_cost)
    assert metrics["ponder_cost"] == output.ponder_cost

    relaxed = tiny_config(
        "albert", num_layers=6, sharing={"strategy": "all", "ratio": 0.5, "tie_penalty": 0.3}
    )
    model = SharedTransformer(relaxed).eval()
    with torch.no_grad():
        for p in model.encoder.deltas.parameters():
            p.normal_(0, 0.1)
    output = model(**model_inputs(batch))
    total, metrics = compute_loss(output, batch, run_config(relaxed, sop_weight=0.0))
    assert output.tie_penalty > 0
    torch.testing.assert_close(total, metrics["mlm_loss"] + 0.3 * output.tie_penalty)
