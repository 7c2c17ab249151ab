"""Every attention path gives what the masked reference gives: unmasked batches (no padding),
causal attention inside the kernel, and padded batches, outputs and gradients alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids, tiny_model

from pretrain.data.loader import collate
from pretrain.model.blocks import (
    LayerContext,
    RowSplit,
    attend,
    matmul_attention,
    split_rows_attention,
)

pytestmark = pytest.mark.unit


def outputs_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_no_mask_equals_a_mask_of_ones(family):
    """The unmasked path (flash kernel on GPU; `is_causal` for llama) against the explicit
    (B,1,1,T) or (B,1,T,T) mask the model builds from an attention mask."""
    model = tiny_model(family).train()
    ids = random_ids(length=16)
    assert_same(
        outputs_and_grads(model, ids, None), outputs_and_grads(model, ids, torch.ones_like(ids))
    )


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_padded_rows_equal_their_unpadded_sequences(family):
    """A right-padded row of a batch gives, at its real positions, the outputs and the
    gradients of the same sequence run alone without padding."""
    model = tiny_model(family).train()
    ids = random_ids(batch=1, length=16)
    real = 10
    mask = torch.ones_like(ids)
    mask[:, real:] = 0

    def real_positions_loss(m, x, attention_mask):
        m.zero_grad(set_to_none=True)
        logits = m(x, attention_mask=attention_mask).logits[:, :real]
        logits.float().square().mean().backward()
        return logits.detach(), {
            n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None
        }

    padded = real_positions_loss(model, ids, mask)
    alone = real_positions_loss(model, ids[:, :real], None)
    assert_same(padded, alone)


def sample(length: int, used: int) -> dict[str, np.ndarray]:
    mask = np.zeros(length, dtype=np.int64)
    mask[:used] = 1
    return {"input_ids": np.arange(length), "attention_mask": mask}


def test_collate_drops_the_mask_only_without_padding():
    full = collate([sample(8, 8), sample(8, 8)])
    assert "attention_mask" not in full and full["input_ids"].shape == (2, 8)
    padded = collate([sample(8, 8), sample(8, 5)])
    assert padded["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]


def padding_mask(causal: bool) -> torch.Tensor:
    """Keys mask (2,1,1,16) with the second row padded after 11 tokens; causal: (2,1,16,16)
    with the diagonal always allowed, as the model builds them."""
    keys = torch.ones(2, 16, dtype=torch.bool)
    keys[1, 11:] = False
    mask = keys[:, None, None, :]
    if causal:
        mask = (torch.ones(16, 16, dtype=torch.bool).tril() & mask) | torch.eye(
            16, dtype=torch.bool
        )
    return mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_matches_fp32_sdpa(causal, masked):
    """bf16 attention on CPU (by matmuls without AMX, else the flash kernel) keeps its dtype
    and gives the fp32 SDPA result of the same inputs to bf16 accuracy, gradients alike."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = padding_mask(causal) if masked else None
    grad_out = torch.randn(2, 4, 16, 8, generator=g)

    def run(x, y, z, fn):
        x, y, z = (t.clone().requires_grad_() for t in (x, y, z))
        out = fn(x, y, z)
        out.float().backward(grad_out.to(out.dtype))
        return out, [t.grad.float() for t in (x, y, z)]

    ctx = LayerContext(mask=mask, is_causal=causal, rope=None)
    out, grads = run(q, k, v, lambda x, y, z: attend(x, y, z, ctx, 0.0))
    assert out.dtype == torch.bfloat16
    expected, expected_grads = run(
        q.float(),
        k.float(),
        v.float(),
        lambda x, y, z: F.scaled_dot_product_attention(
            x, y, z, attn_mask=mask, is_causal=causal and mask is None
        ),
    )
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_matmul_attention_equals_sdpa_in_fp32(causal):
    """The matmul path is exact attention: in fp32 it equals SDPA, masked or not."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    for mask in (None, padding_mask(causal)):
        got = matmul_attention(q, k, v, mask, causal and mask is None, 0.0)
        want = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_split_rows_attention_equals_the_masked_batch(family):
    """GPUs run the full rows of a partly padded batch unmasked and only the padded rows
    with their mask: outputs and gradients equal one masked call over the whole batch."""
    model = tiny_model(family)
    keys_BT = torch.ones(4, 16, dtype=torch.long)
    keys_BT[1, 9:] = 0
    keys_BT[3, 13:] = 0
    ctx = model.attention_context(random_ids(batch=4, length=16), keys_BT, torch.float32)
    rows = RowSplit.of(keys_BT.bool())
    assert rows.full.tolist() == [0, 2] and rows.padded.tolist() == [1, 3]
    g = torch.Generator().manual_seed(2)
    q, k, v, grad_out = (torch.randn(4, 2, 16, 8, generator=g) for _ in range(4))

    def run(fn):
        x, y, z = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(x, y, z)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in (x, y, z)]

    split = run(lambda x, y, z: split_rows_attention(x, y, z, ctx.mask, rows, ctx.is_causal, 0.0))
    masked = run(lambda x, y, z: F.scaled_dot_product_attention(x, y, z, attn_mask=ctx.mask))
    torch.testing.assert_close(split[0], masked[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(split[1], masked[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_row_split_needs_both_kinds_of_row():
    full = torch.ones(3, 8, dtype=torch.bool)
    padded = full.clone()
    padded[:, 5:] = False
    assert RowSplit.of(full) is None and RowSplit.of(padded) is None
    mixed = torch.cat([padded[:1], full[:2]])
    rows = RowSplit.of(mixed)
    assert rows.full.tolist() == [1, 2] and rows.padded.tolist() == [0]
    assert rows.order.tolist() == [2, 0, 1]  # row 0 sits last in cat(full, padded)
