"""Post-training compression (pretrain.export.compressed, python -m pretrain.compress):
int8 linears close to fp32 and stored once per shared set, bit-exact round trips, pruning
to an exact sparsity, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_model
from safetensors.torch import load_file
from torch.ao.nn.quantized.dynamic import Linear as QLinear

from pretrain.data.tokenizer import MODEL_FILE
from pretrain.errors import UserError
from pretrain.export.compressed import (
    INT8,
    is_int8,
    load_int8,
    quantize_int8,
    save_int8,
)
from pretrain.export.native import WEIGHTS, save_native
from pretrain.model import SharedTransformer

VOCAB = 150  # the `tokenizer_dir` fixture's tokenizer

# max |int8 - fp32| / max |fp32 logit| of tiny random models: 0.019 to 0.047 measured over 5
# seeds of albert, llama, relaxed and ACT models. Weights are 8-bit per row, but the x86
# engine quantizes activations per tensor to 7 bits (reduce_range), about 0.4 % rms of their
# range per matmul, and a 4-layer model chains about 20 of them before the logits.
INT8_REL_TOL = 6e-2


@torch.no_grad()
def logits(model: SharedTransformer, seed: int = 1) -> torch.Tensor:
    return model(random_ids(VOCAB, seed=seed)).logits


def model(seed: int = 0, **overrides) -> SharedTransformer:
    return tiny_model(vocab_size=VOCAB, seed=seed, **overrides)


def int8_copy(fp32: SharedTransformer) -> SharedTransformer:
    quantized = SharedTransformer(fp32.cfg).eval()
    quantized.load_state_dict(fp32.state_dict())
    quantize_int8(quantized)
    return quantized


def write_int8(fp32: SharedTransformer, tokenizer_dir: Path, out: Path) -> SharedTransformer:
    quantized = int8_copy(fp32)
    save_int8(quantized, fp32.cfg, tokenizer_dir, out, source="test")
    return quantized


def size(folder: Path) -> int:
    return (folder / WEIGHTS).stat().st_size


# -- int8 -------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides",
    [
        {"sharing": {"strategy": "all"}},
        {"family": "llama"},
        {"sharing": {"strategy": "all", "ratio": 0.5}},  # relaxed: deltas stay fp32
        {"sharing": {"strategy": "all"}, "universal": {"enabled": True}},  # ACT
    ],
    ids=["albert-all", "llama", "relaxed", "act"],
)
def test_int8_logits_close_to_fp32_but_not_identical(overrides):
    fp32 = model(**overrides)
    quantized = int8_copy(fp32)
    expected, got = logits(fp32), logits(quantized)
    assert torch.isfinite(got).all()
    assert not torch.equal(got, expected)
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    assert relative < INT8_REL_TOL, relative


@pytest.mark.unit
def test_a_shared_set_is_quantized_once_and_stored_once(tmp_path, tokenizer_dir):
    fp32 = model(sharing={"strategy": "cycle", "num_sets": 2})
    quantized = int8_copy(fp32)
    plan, encoder = quantized.plan, quantized.encoder
    # Layers 0 and 2 use set 0: one quantized module, the same object.
    assert plan.attention[0] == plan.attention[2] and plan.ffn[0] == plan.ffn[2]
    q0 = encoder.attention[plan.attention[0]].fn.q
    assert isinstance(q0, QLinear) and q0 is encoder.attention[plan.attention[2]].fn.q
    assert encoder.ffn[plan.ffn[0]].fn.up is encoder.ffn[plan.ffn[2]].fn.up
    # albert: q, k, v, o per attention set, up and down per ffn set; outside the encoder the
    # embedding projection (E 16 != H 32), the MLM head's dense layer, the SOP pooler and
    # classifier.
    expected = plan.num_attention_sets * 4 + plan.num_ffn_sets * 2 + 4
    distinct = {id(m) for m in quantized.modules() if isinstance(m, QLinear)}
    assert len(distinct) == expected == 2 * 4 + 2 * 2 + 4
    save_int8(quantized, fp32.cfg, tokenizer_dir, tmp_path / "int8")
    state = load_file(str(tmp_path / "int8" / WEIGHTS))
    stored = sorted(k.removesuffix(f".{INT8}") for k in state if k.endswith(INT8))
    assert len(stored) == expected
    assert "encoder.attention.0.fn.q" in stored and "encoder.attention.2.fn.q" not in stored
    meta = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert meta["compression"]["quantized_linears"] == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides",
    [
        {"sharing": {"strategy": "sequence", "num_sets": 2}},
        {"family": "llama", "sharing": {"strategy": "all"}},
        {"sharing": {"strategy": "all", "ratio": 0.5}},
        {"sharing": {"strategy": "all"}, "universal": {"enabled": True}},
    ],
    ids=["albert-sequence", "llama", "relaxed", "act"],
)
def test_int8_round_trip_is_bit_exact(tmp_path, tokenizer_dir, overrides):
    fp32 = model(**overrides)
    quantized = write_int8(fp32, tokenizer_dir, tmp_path / "int8")
    assert is_int8(tmp_path / "int8")
    assert (tmp_path / "int8" / "tokenizer" / MODEL_FILE).is_file()
    loaded = load_int8(tmp_path / "int8")
    assert not loaded.training
    assert torch.equal(logits(loaded, seed=3), logits(quantized, seed=3))


@pytest.mark.unit
def test_int8_file_is_under_40_percent_of_fp32(tmp_path, tokenizer_dir):
    # Unshared and wide: the linears are most of the weights.
    fp32 = model(hidden_size=64, intermediate_size=256)
    save_native(fp32.state_dict(), fp32.cfg, tokenizer_dir, tmp_path / "fp32")
    write_int8(fp32, tokenizer_dir, tmp_path / "int8")
    ratio = size(tmp_path / "int8") / size(tmp_path / "fp32")
    assert ratio < 0.4, ratio


@pytest.mark.unit
def test_is_int8_and_load_int8_refuse_a_native_export(tmp_path, tokenizer_dir):
    fp32 = model()
    save_native(fp32.state_dict(), fp32.cfg, tokenizer_dir, tmp_path / "native")
    assert not is_int8(tmp_path / "native") and not is_int8(tmp_path / "nothing")
    with pytest.raises(UserError, match="not an int8 export"):
        load_int8(tmp_path / "native")
