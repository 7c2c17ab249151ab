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
    prune,
    quantize_int8,
    save_int8,
    save_pruned,
    write_folder,
)
from pretrain.export.native import WEIGHTS, load_model, save_native
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


@pytest.mark.unit
def test_load_int8_refuses_weights_its_config_does_not_describe(tmp_path, tokenizer_dir):
    write_int8(model(), tokenizer_dir, tmp_path / "int8")
    config = tmp_path / "int8" / "config.json"
    meta = json.loads(config.read_text())
    meta["model"]["intermediate_size"] = 128
    config.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="disagrees with its weights"):
        load_int8(tmp_path / "int8")


# -- pruning ----------------------------------------------------------------------------------


def linear_weights(fp32: SharedTransformer) -> dict[str, torch.Tensor]:
    """The state dict's linear weights: a shared set's appear once."""
    names = {f"{n}.weight" for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)}
    return {k: v for k, v in fp32.state_dict().items() if k in names}


@pytest.mark.unit
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_prune_reaches_the_sparsity_exactly_and_touches_only_linear_weights(sparsity):
    fp32 = model(sharing={"strategy": "cycle", "num_sets": 2})
    before = {k: v.clone() for k, v in fp32.state_dict().items()}
    result = prune(fp32, sparsity)
    weights = linear_weights(fp32)
    # Each shared tensor once: the counts are those of the distinct weights, not of every
    # layer that applies them (4 layers, 2 sets).
    assert sorted(result["tensors"]) == sorted(weights)
    assert result["numel"] == sum(w.numel() for w in weights.values())
    for name, w in weights.items():
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        kept = w != 0
        assert torch.equal(w[kept], before[name][kept])  # survivors keep their values
        if kept.any() and not kept.all():
            assert before[name][~kept].abs().max() <= w[kept].abs().min()  # smallest went
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert result["zeros"] == zeros
    assert abs(result["achieved"] - sparsity) <= len(weights) / result["numel"]
    for key, value in fp32.state_dict().items():
        if key not in weights:  # biases, norms, embeddings, the MLM bias
            assert torch.equal(value, before[key]), key


@pytest.mark.unit
def test_a_pruned_export_loads_as_native(tmp_path, tokenizer_dir):
    fp32 = model(sharing={"strategy": "all"})
    prune(fp32, 0.5)
    compression = {"method": "prune", "sparsity": 0.5, "source": "test"}
    save_pruned(fp32, tokenizer_dir, tmp_path / "pruned", compression)
    meta = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert meta["compression"] == compression
    loaded = load_model(tmp_path / "pruned")
    assert torch.equal(logits(loaded), logits(fp32))


@pytest.mark.unit
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_prune_refuses_a_sparsity_outside_0_1(sparsity):
    with pytest.raises(UserError, match=r"--sparsity must be in \[0, 1\)"):
        prune(model(), sparsity)


@pytest.mark.unit
def test_prune_refuses_an_int8_model():
    with pytest.raises(UserError, match="prune the fp32 model"):
        prune(int8_copy(model()), 0.5)


@pytest.mark.unit
def test_an_error_while_writing_leaves_nothing(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "part").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []


# -- the command line -------------------------------------------------------------------------

COMPRESS = ("-m", "pretrain.compress")


@pytest.fixture
def native_export(tmp_path, tokenizer_dir) -> Path:
    fp32 = model(sharing={"strategy": "all"}, max_position_embeddings=64)
    save_native(fp32.state_dict(), fp32.cfg, tokenizer_dir, tmp_path / "fp32")
    return tmp_path / "fp32"


@pytest.mark.e2e
def test_cli_int8_reports_against_the_source(cli, native_export, shards_dir, tmp_path):
    out = tmp_path / "int8"
    data = (f"--data={shards_dir}", "--data.seq_length=32", "--eval-batches=1")
    result = cli(*COMPRESS, "int8", str(native_export), f"--output={out}", *data, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["compression"]["quantized_linears"] == 4 + 2 + 4
    source, int8 = printed["report"]
    assert (source["kind"], int8["kind"]) == ("native", "int8")
    assert int8["disk_bytes"] < source["disk_bytes"]
    assert abs(int8["eval_loss"] - source["eval_loss"]) < 0.05 * source["eval_loss"]
    assert torch.equal(logits(load_int8(out)), logits(int8_copy(load_model(native_export))))


@pytest.mark.e2e
def test_cli_prunes_to_a_native_export(cli, native_export, tmp_path):
    out = tmp_path / "pruned"
    args = ("prune", str(native_export), f"--output={out}", "--sparsity=0.75", "--no-report")
    result = cli(*COMPRESS, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparsity 0.7500" in result.stdout
    weights = linear_weights(load_model(out))
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == sum(round(0.75 * w.numel()) for w in weights.values())


@pytest.mark.e2e
def test_cli_refuses_a_non_empty_output_and_leaves_it(cli, native_export, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli(*COMPRESS, "int8", str(native_export), f"--output={out}", "--no-report")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --output {out} is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (
        out / "keep.txt"
    ).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "taken"]


@pytest.mark.e2e
def test_cli_refusals_are_one_line(cli, native_export, tmp_path):
    int8 = tmp_path / "int8"
    write_int8(model(sharing={"strategy": "all"}), native_export / "tokenizer", int8)
    cases = {
        ("prune", str(int8)): "is already an int8 export",
        ("prune", str(native_export), "--sparsity=1"): "--sparsity must be in [0, 1)",
        ("int8", str(tmp_path)): "holds no model",
        ("int8", str(native_export)): "carries no data to evaluate on",
    }
    for args, message in cases.items():
        result = cli(*COMPRESS, *args, f"--output={tmp_path / 'out'}")
        assert result.returncode == 2, (args, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr[-2000:])
    assert not (tmp_path / "out").exists()
