"""Resharing: a model under another sharing plan, by SharedTransformer.share_params and
`convert --from-hf ... --reshare`."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from helpers import random_ids, tiny_config, tiny_hf_config, tiny_model

from pretrain.config import ConfigError, SharingConfig
from pretrain.convert import main, parse_reshare
from pretrain.errors import UserError
from pretrain.export import hf, native
from pretrain.model import SharedTransformer
from pretrain.model.reshare import reshare

TOL = 1e-5


def unshared(family: str = "albert", **overrides) -> SharedTransformer:
    # Large weights, so that the layers differ and merging them changes the logits.
    return tiny_model(family, num_layers=6, initializer_range=0.2, **overrides)


def logits(model: SharedTransformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.unit
@pytest.mark.parametrize("family", ["albert", "llama"])
def test_full_rank_svd_reproduces_the_model(family):
    model, ids = unshared(family), random_ids()
    before = logits(model, ids)
    report = model.share_params(1, 4, ratio=0.05)  # rank >= every weight's own rank
    assert model.plan.attention == (0, 1, 1, 1, 1, 2) and model.plan.relaxed
    assert report.ranks and set(report.ranks.values()) == {32}  # min(in, out) of each
    assert max(report.weight_error.values()) < 1e-5
    assert (logits(model, ids) - before).abs().max() <= TOL


def similar_layers(family: str) -> SharedTransformer:
    """Six layers that share a base and differ by their own rank-2 part and a little noise,
    as the layers of a trained stack differ in a few directions."""
    model = tiny_model(family, num_layers=6, initializer_range=0.1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sets in (model.encoder.attention, model.encoder.ffn):
            for name, base in sets[0].named_parameters():
                if not (name.startswith("fn.") and name.endswith(".weight")):
                    continue
                for layer in sets[1:]:
                    own = torch.randn(base.shape[0], 2, generator=g) @ torch.randn(
                        2, base.shape[1], generator=g
                    )
                    noise = torch.randn(base.shape, generator=g)
                    layer.get_parameter(name).copy_(base + 0.01 * own + 0.001 * noise)
    return model


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.unit
@pytest.mark.parametrize("family", ["albert", "llama"])
def test_lower_rank_beats_the_mean_and_degrades_to_it(family):
    ids = random_ids()
    reference = logits(similar_layers(family), ids)
    errors, weight_errors = {}, {}
    for ratio in (0.2, 0.3, 0.5, 1.0):
        model = similar_layers(family)
        report = model.share_params(0, 5, ratio=ratio)
        errors[ratio] = relative(logits(model, ids), reference)
        weight_errors[ratio] = max(report.weight_error.values())
        assert bool(report.ranks) == (ratio < 1)
    assert errors[0.2] < errors[1.0] / 2 and errors[0.3] < errors[1.0], errors
    assert weight_errors[0.2] < weight_errors[0.3] < weight_errors[0.5] < weight_errors[1.0]


@pytest.mark.unit
def test_mean_only_sets_are_the_layer_means():
    model = unshared()
    ups = [model.encoder.ffn[i].fn.up.weight.detach().clone() for i in range(6)]
    report = model.share_params(0, 5, num_sets=2, strategy="sequence")
    assert model.plan.ffn == (0, 0, 0, 1, 1, 1) and len(model.encoder.deltas) == 0
    torch.testing.assert_close(model.encoder.ffn[1].fn.up.weight, torch.stack(ups[3:]).mean(0))
    assert report.params_after < report.params_before and not report.ranks
    assert "sequence M=2" in str(report)


@pytest.mark.unit
def test_a_model_that_already_shares_converts_from_its_unrolled_weights():
    torch.manual_seed(0)
    cfg = tiny_config(num_layers=6, sharing={"strategy": "all", "ratio": 0.5})
    model = SharedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.encoder.deltas.parameters():
            p.normal_(0, 0.2)
    ids = random_ids()
    before = logits(model, ids)
    model.share_params(0, 5, strategy="none")  # unroll: exact
    assert model.plan.attention == tuple(range(6)) and not model.plan.relaxed
    assert (logits(model, ids) - before).abs().max() <= TOL
    model.share_params(0, 5, ratio=0.05)  # back to all, at full rank: exact again
    assert (logits(model, ids) - before).abs().max() <= TOL


@pytest.mark.unit
def test_converted_model_keeps_mode_dtype_and_trains():
    model = unshared("llama").double().train()
    model.share_params(2, 5, ratio=0.5, tie_penalty=0.1)
    assert model.training and model.encoder.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.cfg.sharing.tie_penalty == 0.1
    out = model(random_ids())
    (out.logits.square().mean() + out.tie_penalty).backward()
    assert model.encoder.deltas["3"]["q"].up.weight.grad.abs().sum() > 0
    assert model.encoder.attention[2].fn.q.weight.grad.abs().sum() > 0


@pytest.mark.unit
def test_shared_qk_is_kept_and_never_invented():
    tied = tiny_model("albert", num_layers=4, sharing={"share_qk": True}, initializer_range=0.2)
    ids = random_ids()
    before = logits(tied, ids)
    tied.share_params(0, 3, ratio=0.05)
    assert tied.cfg.sharing.share_qk and tied.encoder.attention[0].fn.k is None
    assert (logits(tied, ids) - before).abs().max() <= TOL
    # Apart again, the keys are the queries: exact.
    state, cfg, _ = reshare(tied.state_dict(), tied.cfg, SharingConfig(strategy="none"))
    apart = SharedTransformer(cfg).eval()
    apart.load_state_dict(state)
    assert (logits(apart, ids) - before).abs().max() <= TOL
    with pytest.raises(ConfigError, match="separate query and key projections"):
        reshare(apart.state_dict(), cfg, SharingConfig(strategy="all", share_qk=True))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((0, 9), {}, "sharing.end (9) must be a layer index below model.num_layers (6)"),
        ((0, 5, 0.95), {}, "leaves no room for a rank-1 delta"),
        ((3, 5), {"strategy": "cycle", "num_sets": 4}, "sharing.num_sets (4) must not exceed"),
        ((0, 5), {"strategy": "all", "num_sets": 3}, "has no meaning for all sharing"),
        ((0, 5), {"strategy": "ring"}, "unknown strategy 'ring'"),
    ],
)
def test_a_plan_the_model_cannot_take_leaves_it_unchanged(args, kwargs, fragment):
    model = unshared()
    cfg, encoder = model.cfg, model.encoder
    try:
        model.share_params(*args, **kwargs)
    except ConfigError as err:
        assert fragment in str(err)
    else:
        pytest.fail(f"share_params{args} {kwargs} was accepted")
    assert model.cfg is cfg and model.encoder is encoder


@pytest.mark.unit
def test_grouped_query_attention_refuses_shared_qk():
    with pytest.raises(ConfigError) as err:
        tiny_config("llama", num_kv_heads=2, sharing={"share_qk": True})
    assert "sharing.share_qk needs model.num_kv_heads == model.num_heads" in str(err.value)
    assert "model.num_kv_heads=4 or sharing.share_qk=false" in str(err.value)
    model = tiny_model("llama", sharing={"share_qk": True})  # the fix: plain multi-head
    assert model(random_ids()).logits.shape == (2, 12, 97)


# -- tools/convert_checkpoint.py --from-hf --reshare ------------------------------------------

ACCEPTED = [
    "strategy=all",
    "strategy=all,ratio=0.5",
    "strategy=all,start=1,end=2,ratio=0.8",
    "strategy=sequence,num_sets=2,ratio=0.5",
    "strategy=cycle,num_sets=2,scope=ffn,ratio=0.5,tie_penalty=0.1",
    "strategy=cycle_rev,num_sets=2,scope=attention",
]
REFUSED = {
    "strategy=all,share_qk=true": "separate query and key projections",
    "strategy=all,ratio=0.95": "leaves no room for a rank-1 delta",
    "strategy=all,end=7": "sharing.end (7) must be a layer index",
    "strategy=sequence,num_sets=3": "must be divisible by sharing.num_sets (3)",
    "strategy=all,ratio=0.5,stride=2": "stride",
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    big = {"num_hidden_layers": 4, "initializer_range": 0.2}
    transformers.LlamaForCausalLM(
        tiny_hf_config("Llama", tie_word_embeddings=True, num_key_value_heads=2, **big)
    ).save_pretrained(root / "llama")
    transformers.BertForMaskedLM(tiny_hf_config("Bert", **big)).save_pretrained(root / "bert")
    return root


def convert(*args) -> int:
    """tools/convert_checkpoint.py in this process (its errors raise UserError)."""
    return main([str(a) for a in args])


def share_import(source, out, share: str) -> int:
    """Import the HF folder `source` to `out`, reshared by `--reshare share`, verified."""
    return convert(
        "--from-hf", source, "--format", "native", "--output", out, "--reshare", share, "--verify"
    )


def verified(stdout: str, what: str) -> float:
    return float(re.search(rf"{what} = (\S+)", stdout).group(1))


@pytest.mark.parity
@pytest.mark.parametrize("source", ["llama", "bert"])
@pytest.mark.parametrize("share", ACCEPTED)
def test_every_accepted_share_loads_verifies_and_exports(
    hf_models, tokenizer_dir, tmp_path, capsys, source, share
):
    out = tmp_path / "native"
    assert share_import(hf_models / source, out, share) == 0
    stdout = capsys.readouterr().out
    assert verified(stdout, r"verify: max \|logit diff\|") <= TOL
    assert verified(stdout, "against the imported model") > TOL  # it did reshare
    model = native.load_model(out)
    assert model.cfg.sharing == parse_reshare(share)
    assert model.plan.relaxed == ("ratio" in share)
    hf.save_hf(model.state_dict(), model.cfg, tokenizer_dir, tmp_path / "hf")
    assert hf.verify(model, tmp_path / "hf") <= TOL


@pytest.mark.unit
@pytest.mark.parametrize(("share", "fragment"), REFUSED.items())
def test_a_share_it_cannot_honour_is_refused_before_writing(hf_models, tmp_path, share, fragment):
    out = tmp_path / "native"
    with pytest.raises(UserError) as err:
        share_import(hf_models / "llama", out, share)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.unit
def test_share_applies_to_imports_only(tmp_path):
    with pytest.raises(UserError, match="use it with --from-hf"):
        convert(
            "--checkpoint",
            str(tmp_path),
            "--format",
            "native",
            "--output",
            str(tmp_path / "o"),
            "--reshare",
            "strategy=all",
        )


@pytest.mark.parity
def test_an_import_exports_with_a_tokenizer_given_and_says_so_without(
    hf_models, tokenizer_dir, tmp_path, capsys
):
    assert share_import(hf_models / "llama", tmp_path / "a", "strategy=all") == 0
    assert (
        convert("--checkpoint", tmp_path / "a", "--format", "native", "--output", tmp_path / "b")
        == 0
    )
    with pytest.raises(UserError, match=r"no tokenizer of ours .* pass --tokenizer DIR"):
        convert("--checkpoint", tmp_path / "a", "--format", "hf", "--output", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    capsys.readouterr()
    exported = [tmp_path / "a", "--tokenizer", tokenizer_dir, "--format", "hf"]
    assert convert("--checkpoint", *exported, "--output", tmp_path / "d", "--verify") == 0
    assert verified(capsys.readouterr().out, r"verify: max \|logit diff\|") <= TOL


@pytest.mark.e2e
def test_cli_reshares_with_verify_and_refuses_in_one_line(hf_models, tmp_path, cli):
    tool = "tools/convert_checkpoint.py"
    source = ["--from-hf", str(hf_models / "llama"), "--format", "native"]
    ok = cli(
        tool,
        *source,
        "--output",
        str(tmp_path / "a"),
        "--reshare",
        "ratio=0.5,strategy=all",
        "--verify",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "delta ranks" in ok.stdout and "verify: max |logit diff| = 0" in ok.stdout
    refused = cli(tool, *source, "--output", str(tmp_path / "b"), "--reshare", "share_qk=true")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        refused.stderr.strip().splitlines()[-1]
    ]
    assert not (tmp_path / "b").exists()
