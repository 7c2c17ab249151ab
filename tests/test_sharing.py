"""The sharing plan: layer -> set tables, one Parameter per set, unique counts."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_config, tiny_model

from pretrain.model import STRATEGIES, SharingPlan

pytestmark = pytest.mark.unit

# Tables written out by hand from the strategy definitions in the README.
TABLES = [
    ("none", 6, None, [0, 1, 2, 3, 4, 5]),
    ("all", 6, None, [0, 0, 0, 0, 0, 0]),
    ("sequence", 12, 3, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
    ("sequence", 6, 6, [0, 1, 2, 3, 4, 5]),
    ("cycle", 6, 4, [0, 1, 2, 3, 0, 1]),
    ("cycle", 9, 3, [0, 1, 2, 0, 1, 2, 0, 1, 2]),
    ("cycle_rev", 9, 3, [0, 1, 2, 0, 1, 2, 2, 1, 0]),
    ("cycle_rev", 6, 2, [0, 1, 0, 1, 1, 0]),
    ("cycle_rev", 4, 2, [0, 1, 1, 0]),
]


@pytest.mark.parametrize(("strategy", "L", "M", "expected"), TABLES)
def test_strategy_tables(strategy, L, M, expected):
    assert STRATEGIES[strategy].assign(L, M or 1) == expected
    cfg = tiny_config(num_layers=L, sharing={"strategy": strategy, "num_sets": M})
    plan = SharingPlan.from_config(cfg)
    assert list(plan.attention) == expected
    assert list(plan.ffn) == expected


def test_every_strategy_has_a_table():
    assert {row[0] for row in TABLES} == set(STRATEGIES)


def test_scope_attention_shares_only_attention():
    plan = SharingPlan.from_config(tiny_config(sharing={"strategy": "all", "scope": "attention"}))
    assert plan.attention == (0, 0, 0, 0)
    assert plan.ffn == (0, 1, 2, 3)


def test_scope_ffn_shares_only_ffn():
    plan = SharingPlan.from_config(
        tiny_config(sharing={"strategy": "cycle", "num_sets": 2, "scope": "ffn"})
    )
    assert plan.attention == (0, 1, 2, 3)
    assert plan.ffn == (0, 1, 0, 1)


def test_range_shares_only_inside():
    # Share layers 2..7 of 12; the others keep their own sets.
    cfg = tiny_config(num_layers=12, sharing={"strategy": "all", "start": 2, "end": 7})
    plan = SharingPlan.from_config(cfg)
    assert plan.attention == (0, 1, 2, 2, 2, 2, 2, 2, 3, 4, 5, 6)
    cfg = tiny_config(num_layers=12, sharing={"strategy": "cycle", "num_sets": 2, "start": 4})
    assert SharingPlan.from_config(cfg).attention == (0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 4, 5)


def layer_parameters(model, layer: int) -> list[torch.nn.Parameter]:
    """The Parameter objects logical layer `layer` computes with, via the plan."""
    enc, plan = model.encoder, model.plan
    attention = enc.attention[plan.attention[layer]]
    ffn = enc.ffn[plan.ffn[layer]]
    return [*attention.parameters(), *ffn.parameters()]


@pytest.mark.parametrize(
    "sharing",
    [
        {"strategy": "all"},
        {"strategy": "cycle", "num_sets": 2},
        {"strategy": "sequence", "num_sets": 2},
        {"strategy": "cycle_rev", "num_sets": 2},
    ],
    ids=lambda s: s["strategy"],
)
def test_shared_layers_hold_the_same_parameter_objects(sharing):
    model = tiny_model(sharing=sharing)
    plan = model.plan
    for i in range(4):
        for j in range(4):
            same = all(
                a is b
                for a, b in zip(layer_parameters(model, i), layer_parameters(model, j), strict=True)
            )
            assert same == (plan.attention[i] == plan.attention[j]), (i, j)


def test_unique_parameters_count_each_shared_tensor_once():
    shared = tiny_model(sharing={"strategy": "all"})
    unshared = tiny_model(sharing={"strategy": "none"})
    block = sum(p.numel() for p in layer_parameters(shared, 0))
    unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert unique(unshared) - unique(shared) == 3 * block
    # No tensor appears under two names: DeepSpeed's fp32 consolidation drops aliases.
    state = shared.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    assert not any(k.startswith("encoder.attention.1") for k in state)


def test_scope_changes_unique_count():
    full = tiny_model(sharing={"strategy": "all"})
    attention_only = tiny_model(sharing={"strategy": "all", "scope": "attention"})
    ffn_params = sum(p.numel() for p in full.encoder.ffn[0].parameters())
    unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert unique(attention_only) - unique(full) == 3 * ffn_params


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_share_qk_uses_one_projection(family):
    tied = tiny_model(family, sharing={"share_qk": True})
    untied = tiny_model(family)
    attn = tied.encoder.attention[0].fn
    assert attn.k is None
    H = 32
    per_layer = H * H + (H if family == "albert" else 0)
    unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert unique(untied) - unique(tied) == 4 * per_layer
    # Same function as an untied model whose key projection is a copy of the query's.
    state = tied.state_dict()
    for i in range(4):
        for suffix in ("weight", "bias"):
            key = f"encoder.attention.{i}.fn.q.{suffix}"
            if key in state:
                state[key.replace(".q.", ".k.")] = state[key]
    untied.load_state_dict(state)
    ids = random_ids()
    torch.testing.assert_close(tied(ids).logits, untied(ids).logits, rtol=0, atol=0)
