"""Parity with Hugging Face ALBERT and Llama through the package's state-dict adapters."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import random_ids, tiny_config

from pretrain.export import ConversionError, hf_albert, hf_llama
from pretrain.model import SharedTransformer

pytestmark = pytest.mark.parity

TOL = 1e-5  # fp32
V = 300
# Large enough weights that near-identical functions (exact vs tanh GELU, eps, scaling)
# differ by far more than TOL; the default 0.02 leaves activations too close to zero.
INIT = 0.2


def albert_hf(groups: int, embedding_size: int = 16, layers: int = 4, pretraining=False):
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        vocab_size=V,
        embedding_size=embedding_size,
        hidden_size=64,
        num_hidden_layers=layers,
        num_hidden_groups=groups,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        max_position_embeddings=64,
        initializer_range=INIT,
    )
    cls = transformers.AlbertForPreTraining if pretraining else transformers.AlbertForMaskedLM
    return cls(config).eval()


def albert_inputs():
    ids = random_ids(V, batch=3, length=20)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    return ids, mask, types


def ours_from_albert(hf, sop_head=False) -> SharedTransformer:
    cfg = hf_albert.config_from_hf(hf.config.to_dict(), sop_head=sop_head)
    model = SharedTransformer(cfg).eval()
    model.load_state_dict(hf_albert.from_hf(hf.state_dict(), cfg), strict=True)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    ("groups", "layers", "strategy"),
    [(1, 4, "all"), (2, 4, "sequence"), (3, 6, "sequence"), (4, 4, "none")],
)
def test_albert_masked_lm_parity(groups, layers, strategy):
    hf = albert_hf(groups, layers=layers)
    ours = ours_from_albert(hf)
    assert ours.cfg.sharing.strategy == strategy
    assert ours.plan.num_attention_sets == groups
    ids, mask, types = albert_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    assert max_diff(got, expected, mask) <= TOL
    # Same number of parameters: the shared ones are shared on both sides.
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_albert_pretraining_parity_with_sop_head():
    hf = albert_hf(2, pretraining=True)
    ours = ours_from_albert(hf, sop_head=True)
    ids, mask, types = albert_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(got.logits, expected.prediction_logits, mask) <= TOL
    assert max_diff(got.sop_logits, expected.sop_logits) <= TOL


def test_albert_e_equals_h_needs_identity_projection():
    hf = albert_hf(1, embedding_size=64)
    with pytest.raises(ConversionError, match="non-identity embedding projection"):
        ours_from_albert(hf)
    with torch.no_grad():
        hf.albert.encoder.embedding_hidden_mapping_in.weight.copy_(torch.eye(64))
        hf.albert.encoder.embedding_hidden_mapping_in.bias.zero_()
    ours = ours_from_albert(hf)
    assert ours.embeddings.project is None
    ids, mask, types = albert_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    assert max_diff(got, expected, mask) <= TOL


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_albert_round_trip_is_exact(groups):
    hf = albert_hf(groups, pretraining=True)
    ours = ours_from_albert(hf, sop_head=True)
    back = hf_albert.to_hf(ours.state_dict(), ours.cfg)
    original = hf.state_dict()
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    assert hf_albert.config_to_hf(ours.cfg)["num_hidden_groups"] == groups


@pytest.mark.parametrize(
    ("sharing", "groups"),
    [
        ({"strategy": "all"}, 1),
        ({"strategy": "sequence", "num_sets": 2}, 2),
        ({"strategy": "cycle", "num_sets": 2}, 4),  # not expressible: unrolled
        ({"strategy": "all", "scope": "ffn"}, 4),
        ({"strategy": "all", "share_qk": True}, 1),
    ],
    ids=["all", "sequence", "cycle", "scope-ffn", "share-qk"],
)
def test_albert_export_matches_our_logits(sharing, groups):
    torch.manual_seed(0)
    cfg = tiny_config(
        "albert", sharing=sharing, vocab_size=V, max_position_embeddings=64, initializer_range=INIT
    )
    ours = SharedTransformer(cfg).eval()
    hf_config = transformers.AlbertConfig(**hf_albert.config_to_hf(cfg))
    assert hf_config.num_hidden_groups == groups
    hf = transformers.AlbertForPreTraining(hf_config).eval()
    hf.load_state_dict(hf_albert.to_hf(ours.state_dict(), cfg), strict=True)
    ids, mask, types = albert_inputs()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask, token_type_ids=types)
        got = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(got.prediction_logits, expected.logits, mask) <= TOL
    assert max_diff(got.sop_logits, expected.sop_logits) <= TOL


def llama_hf(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        initializer_range=INIT,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_causal_lm_parity():
    hf = llama_hf()
    cfg = hf_llama.config_from_hf(hf.config.to_dict())
    assert cfg.sharing.strategy == "none" and cfg.rope_theta == 500000.0
    ours = SharedTransformer(cfg).eval()
    ours.load_state_dict(hf_llama.from_hf(hf.state_dict(), cfg), strict=True)
    ids = random_ids(V, batch=2, length=24)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL
        got = ours(ids, attention_mask=mask).logits
        expected = hf(input_ids=ids, attention_mask=mask).logits
    assert max_diff(got, expected, mask) <= TOL
    back = hf_llama.to_hf(ours.state_dict(), cfg)
    original = hf.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize(
    "sharing",
    [
        {"strategy": "sequence", "num_sets": 2},
        {"strategy": "cycle", "num_sets": 2, "share_qk": True},
    ],
    ids=["sequence", "cycle-share-qk"],
)
def test_llama_export_folds_factorized_embedding(sharing):
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama",
        sharing=sharing,
        vocab_size=V,
        hidden_size=64,
        max_position_embeddings=64,
        initializer_range=INIT,
    )
    ours = SharedTransformer(cfg).eval()
    assert ours.embeddings.project is not None  # E = 16 < H = 64
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_llama.config_to_hf(cfg))
    ).eval()
    hf.load_state_dict(hf_llama.to_hf(ours.state_dict(), cfg), strict=True)
    ids = random_ids(V, batch=2, length=24)
    with torch.no_grad():
        assert max_diff(hf(input_ids=ids).logits, ours(ids).logits) <= TOL


def test_import_into_a_sharing_plan_that_does_not_fit_fails():
    hf = albert_hf(4)
    cfg = hf_albert.config_from_hf(hf.config.to_dict())
    shared = tiny_config(
        "albert",
        sharing={"strategy": "all"},
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=cfg.type_vocab_size,
    )
    with pytest.raises(ConversionError, match="differs from"):
        hf_albert.from_hf(hf.state_dict(), shared)


def test_untied_llama_is_refused():
    hf = llama_hf()
    hf.config.tie_word_embeddings = False
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        hf_llama.config_from_hf(hf.config.to_dict())
