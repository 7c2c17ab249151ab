"""The check an export gets: the model read back from the written folder and ours, on one
batch (a padded row included), give the same logits at the real tokens."""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig


def verify_batch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, cfg.vocab_size, (2, min(32, cfg.max_position_embeddings)), generator=g)
    mask = torch.ones_like(ids)
    mask[1, ids.shape[1] // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def max_logit_diff(ours: torch.nn.Module, other: torch.nn.Module) -> float:
    """Largest |logit difference| between our model and `other` (called with `input_ids`
    and `attention_mask`, returning `.logits`) on `verify_batch`, at real tokens."""
    batch = verify_batch(ours.cfg)
    expected = ours(**batch).logits
    got = other(**batch).logits
    keep = batch["attention_mask"].bool()
    return (got[keep] - expected[keep]).abs().max().item()
