"""Relaxed sharing: per-layer low-rank deltas, their rank, tie penalty and export."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import random_ids, tiny_config

from pretrain.config import ConfigError
from pretrain.export import hf_albert, hf_llama
from pretrain.model import SharedTransformer, count
from pretrain.model.reshare import fold_relaxed


def relaxed(family="albert", ratio=0.5, seed=0, **sharing) -> SharedTransformer:
    torch.manual_seed(seed)
    sharing = {"strategy": "all", "ratio": ratio, **sharing}
    return SharedTransformer(tiny_config(family, sharing=sharing, num_layers=6)).eval()


def perturb_deltas(model: SharedTransformer, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.encoder.deltas.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def shared_params_in_range(model) -> int:
    return sum(p.numel() for p in model.encoder.attention.parameters()) + sum(
        p.numel() for p in model.encoder.ffn.parameters()
    )


def rank_of(model) -> int:
    return next(iter(model.encoder.deltas["0"].values())).down.weight.shape[0]


@pytest.mark.unit
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25, 0.1])
def test_rank_spends_the_rest_of_the_budget(ratio):
    model = relaxed(ratio=ratio)
    shared = shared_params_in_range(model)
    deltas = sum(p.numel() for p in model.encoder.deltas.parameters())
    rank = rank_of(model)
    # The largest rank whose deltas keep the shared part at least `ratio` of the range.
    assert shared / (shared + deltas) >= ratio
    per_rank = deltas // rank
    assert shared / (shared + deltas + per_rank) < ratio


@pytest.mark.unit
def test_ratio_too_close_to_one_for_the_model_size_is_refused():
    with pytest.raises(ConfigError, match=r"sharing.ratio \(0.9\) leaves no room.*<= 0.76"):
        relaxed(ratio=0.9)


@pytest.mark.unit
def test_ratio_one_is_pure_sharing():
    model = relaxed(ratio=1.0)
    assert len(model.encoder.deltas) == 0
    assert model(random_ids()).tie_penalty is None


@pytest.mark.unit
def test_deltas_start_at_zero_so_training_starts_shared():
    pure = relaxed(ratio=1.0, seed=0)
    soft = relaxed(ratio=0.5, seed=0)
    state = {k: v for k, v in soft.state_dict().items() if not k.startswith("encoder.deltas")}
    pure.load_state_dict(state)
    ids = random_ids()
    torch.testing.assert_close(soft(ids).logits, pure(ids).logits, rtol=0, atol=0)
    assert soft(ids).tie_penalty.item() == 0.0


@pytest.mark.unit
def test_deltas_cover_every_shared_linear_of_every_range_layer():
    model = relaxed(ratio=0.5, start=1, end=4)
    assert sorted(model.encoder.deltas.keys()) == ["1", "2", "3", "4"]
    assert sorted(model.encoder.deltas["1"].keys()) == ["down", "k", "o", "q", "up", "v"]
    attention_only = relaxed(ratio=0.5, scope="attention")
    assert sorted(attention_only.encoder.deltas["0"].keys()) == ["k", "o", "q", "v"]
    llama = relaxed("llama", ratio=0.5, share_qk=True)
    assert sorted(llama.encoder.deltas["0"].keys()) == ["down", "gate", "o", "q", "up", "v"]


@pytest.mark.unit
def test_deltas_make_layers_differ_and_train():
    model = relaxed(ratio=0.5)
    perturb_deltas(model)
    out = model(random_ids())
    loss = out.logits.square().mean() + out.tie_penalty
    loss.backward()
    assert model.encoder.deltas["3"]["q"].up.weight.grad.abs().sum() > 0
    assert model.encoder.attention[0].fn.q.weight.grad.abs().sum() > 0


@pytest.mark.unit
def test_tie_penalty_is_sum_of_squared_deltas():
    model = relaxed(ratio=0.5)
    perturb_deltas(model)
    expected = sum(
        (d.up.weight @ d.down.weight).square().sum()
        for layer in model.encoder.deltas.values()
        for d in layer.values()
    )
    got = model(random_ids()).tie_penalty
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert got > 0


@pytest.mark.unit
def test_folded_deltas_compute_the_same_function():
    model = relaxed(ratio=0.5, strategy="cycle", num_sets=2)
    perturb_deltas(model)
    state, flat_cfg = fold_relaxed(model.state_dict(), model.cfg)
    assert flat_cfg.sharing.strategy == "none"
    flat = SharedTransformer(flat_cfg).eval()
    flat.load_state_dict(state, strict=True)
    ids = random_ids()
    torch.testing.assert_close(flat(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parity
def test_relaxed_albert_exports_unrolled_to_hf():
    model = relaxed(ratio=0.5)
    perturb_deltas(model)
    hf_cfg = transformers.AlbertConfig(**hf_albert.config_to_hf(model.cfg))
    assert hf_cfg.num_hidden_groups == 6
    hf = transformers.AlbertForPreTraining(hf_cfg).eval()
    hf.load_state_dict(hf_albert.to_hf(model.state_dict(), model.cfg), strict=True)
    ids = random_ids()
    with torch.no_grad():
        diff = (hf(input_ids=ids).prediction_logits - model(ids).logits).abs().max()
    assert diff <= 1e-5


@pytest.mark.parity
def test_relaxed_llama_exports_to_hf():
    model = relaxed("llama", ratio=0.5)
    perturb_deltas(model)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_llama.config_to_hf(model.cfg))
    ).eval()
    hf.load_state_dict(hf_llama.to_hf(model.state_dict(), model.cfg), strict=True)
    ids = random_ids()
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() <= 1e-5


@pytest.mark.unit
def test_accounting_counts_deltas_once_per_layer():
    pure, soft = relaxed(ratio=1.0), relaxed(ratio=0.5)
    a, b = count(pure, seq_length=16), count(soft, seq_length=16)
    deltas = sum(p.numel() for p in soft.encoder.deltas.parameters())
    assert b.unique_params - a.unique_params == deltas
    assert b.effective_params - a.effective_params == deltas
    assert "blocks.deltas" in {c.name for c in b.components}
    assert b.flops_per_token > a.flops_per_token


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sharing", "fragment"),
    [
        ({"strategy": "all", "ratio": 0.0}, "sharing.ratio (0.0) must be in (0, 1]"),
        ({"strategy": "none", "ratio": 0.5}, "but sharing.strategy is none"),
        ({"strategy": "all", "tie_penalty": 0.1}, "only with sharing.ratio < 1"),
    ],
)
def test_bad_relaxed_settings(sharing, fragment):
    with pytest.raises(ConfigError, match=r".*") as err:
        tiny_config(sharing=sharing)
    assert fragment in str(err.value)
