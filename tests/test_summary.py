"""Accounting: unique vs effective parameters and FLOPs per token, and its CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import REPO, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import Config, load_config
from pretrain.data.masking import IGNORE_INDEX
from pretrain.export import hf_albert, hf_llama
from pretrain.model import SharedTransformer, count
from pretrain.model.accounting import account
from pretrain.objectives import compute_loss, model_inputs


def hf_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parity
def test_albert_base_unique_params_equal_hf():
    cfg = load_config(REPO / "configs" / "albert-base.yaml")
    hf = transformers.AlbertForPreTraining(
        transformers.AlbertConfig(**hf_albert.config_to_hf(cfg.model))
    )
    assert account(cfg).unique_params == hf_param_count(hf)
    # AlbertModel alone is the familiar 11.68M of albert-base-v2.
    assert hf_param_count(hf.albert) == 11_683_584


@pytest.mark.unit
def test_effective_params_unroll_shared_blocks():
    cfg = load_config(REPO / "configs" / "albert-base.yaml")
    shared = account(cfg)
    unshared = account(
        load_config(REPO / "configs" / "albert-base.yaml", ["--model.sharing.strategy=none"])
    )
    # Unrolled, the all-shared model is exactly the unshared one.
    assert shared.effective_params == unshared.effective_params == unshared.unique_params
    H, F, L = 768, 3072, 12
    block = 4 * (H * H + H) + 2 * H + (H * F + F) + (F * H + H) + 2 * H
    assert shared.effective_params - shared.unique_params == (L - 1) * block


@pytest.mark.parity
def test_llama_unrolled_count_equals_hf():
    cfg = tiny_config("llama", sharing={"strategy": "cycle", "num_sets": 2})  # E=16 < H=32
    model = SharedTransformer(cfg)
    acc = count(model, seq_length=16)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama.config_to_hf(cfg)))
    # HF unrolls the layers and folds the factorized table to V x H; our effective count
    # unrolls the layers but keeps the V x E table and E x H projection.
    V, E, H = cfg.vocab_size, cfg.embedding_size, cfg.hidden_size
    assert acc.effective_params - (V * E + E * H) == hf_param_count(hf) - V * H


@pytest.mark.unit
def test_flops_per_token_by_hand():
    cfg = load_config(REPO / "configs" / "tiny-albert.yaml")
    m, T = cfg.model, cfg.data.seq_length
    V, E, H, F, L = m.vocab_size, m.embedding_size, m.hidden_size, m.intermediate_size, m.num_layers
    predicted = min(cfg.objective.max_predictions, round(0.15 * T))
    forward = (
        2 * E * H  # embedding projection
        + L * (2 * 4 * H * H + 4 * T * H + 2 * 2 * H * F)  # per layer application
        + predicted / T * (2 * H * E + 2 * E * V)  # MLM head at masked positions only
        + (2 * H * H + 2 * H * 2) / T  # SOP head, once per sequence
    )
    assert account(cfg).flops_per_token == pytest.approx(3 * forward)


@pytest.mark.unit
def test_flops_scale_with_depth_not_unique_params():
    base = load_config(REPO / "configs" / "tiny-albert.yaml")
    deep = load_config(REPO / "configs" / "tiny-albert.yaml", ["--model.num_layers=8"])
    a, b = account(base), account(deep)
    assert a.unique_params == b.unique_params  # all-shared: depth adds no parameters
    per_layer = (b.flops_per_token - a.flops_per_token) / 4
    assert per_layer > 0
    assert b.flops_per_token == pytest.approx(a.flops_per_token + 4 * per_layer)


@pytest.mark.e2e
def test_summary_cli_json(cli):
    result = cli("-m", "pretrain.summary", "configs/ut-base.yaml", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"unique_params", "effective_params", "flops_per_token", "components"} <= set(data)
    names = {c["name"] for c in data["components"]}
    assert {
        "embeddings",
        "blocks.attention",
        "blocks.ffn",
        "blocks.halting",
        "heads.token",
    } <= names
    assert data["effective_params"] > 7 * data["unique_params"]


@pytest.mark.e2e
def test_summary_cli_table_with_overrides(cli):
    result = cli(
        "-m",
        "pretrain.summary",
        "configs/tiny-llama.yaml",
        "--model.num_layers=8",
        "--model.sharing.num_sets=4",
    )
    assert result.returncode == 0, result.stderr
    assert "L=8" in result.stdout and "sequence M=4" in result.stdout
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    cfg = load_config(
        REPO / "configs" / "tiny-llama.yaml",
        ["--model.num_layers=8", "--model.sharing.num_sets=4"],
    )
    assert f"{account(cfg).unique_params:,}" in total


@pytest.mark.unit
def test_default_config_accounts():
    assert account(Config()).unique_params > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny-albert", []),
        ("tiny-albert", ["--model.sharing.strategy=none"]),
        ("tiny-llama", []),
        ("tiny-llama", ["--model.sharing.ratio=0.5"]),
    ],
)
def test_flops_per_token_match_a_flop_counter(name, overrides):
    """MFU is only as true as its FLOPs: the accounting equals what torch's FLOP counter sees
    in one forward and backward of the model (every matmul, every application of a shared
    layer), on a batch with as many masked positions as training has."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    torch.manual_seed(0)
    model = SharedTransformer(cfg.model).train()
    B, T = 2, cfg.data.seq_length
    ids_BT = torch.randint(5, cfg.model.vocab_size, (B, T))
    if cfg.model.causal:
        batch = {"input_ids": ids_BT, "labels": ids_BT}
    else:
        predicted = min(cfg.objective.max_predictions, round(cfg.objective.mask_prob * T))
        labels_BT = torch.full((B, T), IGNORE_INDEX)
        labels_BT[:, 1 : 1 + predicted] = ids_BT[:, 1 : 1 + predicted]
        batch = {
            "input_ids": ids_BT,
            "token_type_ids": torch.zeros_like(ids_BT),
            "mlm_labels": labels_BT,
            "sop_labels": torch.zeros(B, dtype=torch.long),
        }
    # The math backend decomposes attention into matmuls, counted as the accounting counts
    # them (a fused kernel's backward recomputes the scores: more work, not more model FLOPs).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = compute_loss(model(**model_inputs(batch)), batch, cfg)
        loss.backward()
    with FlopCounterMode(display=False) as per_step:
        model.encoder.tie_penalty()  # relaxed sharing: once per step, not per token
    counted = counter.get_total_flops() - per_step.get_total_flops()
    assert counted == pytest.approx(account(cfg).flops_per_token * B * T, rel=1e-3)
