"""Checkpoint conversion: DeepSpeed (ZeRO-2/3, 2 ranks) -> native / Hugging Face, and back."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import transformers
import yaml
from helpers import BASE, REPO, env, launch_args, run_process, tiny_hf_config, train

from pretrain.config import load_config
from pretrain.engine.manifest import write_manifest
from pretrain.export.checkpoint import read_checkpoint
from pretrain.export.hf import save_hf
from pretrain.export.native import load_model, save_native
from pretrain.model.accounting import account

transformers.logging.set_verbosity_error()
TOL = 1e-5

# name -> (config, zero stage, overrides): the sharing plans and shapes the export must cover
RUNS = {
    "all": ("tiny-albert.yaml", 2, []),
    "sequence": (
        "tiny-albert.yaml",
        3,
        ["--model.sharing.strategy=sequence", "--model.sharing.num_sets=2"],
    ),
    "cycle": (
        "tiny-albert.yaml",
        2,
        ["--model.sharing.strategy=cycle", "--model.sharing.num_sets=2"],
    ),
    "e_equals_h": ("tiny-albert.yaml", 3, ["--model.embedding_size=64"]),
    "llama": ("tiny-llama.yaml", 3, []),
}


@pytest.fixture(scope="module")
def checkpoints(shards_dir, tmp_path_factory):
    out = {}
    for name, (config, stage, overrides) in RUNS.items():
        run = tmp_path_factory.mktemp(name)
        train(
            shards_dir,
            run,
            f"--engine.zero_stage={stage}",
            "--train.max_steps=2",
            *overrides,
            config=config,
        )
        out[name] = run
    return out


def batch(vocab: int = 150):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, vocab, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return ids, mask


@pytest.mark.parity
@pytest.mark.parametrize("name", ["all", "sequence", "cycle", "e_equals_h"])
def test_albert_export_matches_our_logits(checkpoints, tmp_path, name):
    trained = read_checkpoint(checkpoints[name])
    save_native(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "native")
    save_hf(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "hf")
    ours = load_model(tmp_path / "native")
    hf = transformers.AutoModelForPreTraining.from_pretrained(
        tmp_path / "hf", local_files_only=True
    )
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids, mask = batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask)
        got = hf.eval()(input_ids=ids, attention_mask=mask)
        got_mlm = mlm.eval()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert expected.logits.shape == (2, 24, 150)
    assert (got.prediction_logits - expected.logits)[keep].abs().max() <= TOL
    assert (got_mlm - expected.logits)[keep].abs().max() <= TOL
    assert (got.sop_logits - expected.sop_logits).abs().max() <= TOL
    groups = {"all": 1, "sequence": 2, "cycle": 4, "e_equals_h": 1}[name]
    assert hf.config.num_hidden_groups == groups


@pytest.mark.parity
def test_shared_parameters_stay_shared_in_the_file(checkpoints, tmp_path):
    sizes = {}
    for name in ("all", "cycle"):
        trained = read_checkpoint(checkpoints[name])
        save_hf(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / name)
        unique = sum(v.numel() for v in trained.state.values())
        sizes[name] = (tmp_path / name / "model.safetensors").stat().st_size, unique
    file_bytes, unique = sizes["all"]
    assert abs(file_bytes / (4 * unique) - 1) < 0.02, (file_bytes, unique)
    assert sizes["cycle"][0] > 1.5 * file_bytes  # unrolled into 4 groups


@pytest.mark.parity
def test_tokenizer_export_encodes_like_ours(checkpoints, tmp_path):
    from pretrain.data.tokenizer import Tokenizer

    trained = read_checkpoint(checkpoints["all"])
    save_hf(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = Tokenizer(trained.tokenizer_dir)
    text = "The king speaks.  A storm at   sea!\nGold and silver"
    assert hf_tok(text)["input_ids"] == [4, *ours.sp.encode(text), 5]
    assert (hf_tok.mask_token_id, hf_tok.pad_token_id) == (6, 0)


@pytest.mark.parity
def test_llama_export_matches_and_generates(checkpoints, tmp_path):
    trained = read_checkpoint(checkpoints["llama"])
    assert trained.cfg.embedding_size < trained.cfg.hidden_size  # folded on export
    save_native(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "native")
    save_hf(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "hf")
    ours = load_model(tmp_path / "native")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids, _ = batch()
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids).logits).abs().max() <= TOL
    prompt = tok("The king", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5


def run_convert(*args):
    return run_process(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
        env=env(),
    )


@pytest.mark.parity
def test_cli_verify_and_notes(checkpoints, tmp_path):
    result = run_convert(
        "--checkpoint",
        checkpoints["cycle"],
        "--format",
        "hf",
        "--output",
        tmp_path / "hf",
        "--verify",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unrolled into 4 groups" in result.stdout
    diff = float(re.search(r"max \|logit diff\| = (\S+)", result.stdout).group(1))
    assert diff <= TOL
    check_model_card(checkpoints["cycle"], tmp_path / "hf")


def check_model_card(run, folder) -> None:
    """The export's README.md: the Hub's YAML header, then the run's own figures."""
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert meta["license"] == "apache-2.0"
    assert {"albert", "cross-layer-parameter-sharing"} <= set(meta["tags"])
    cfg = load_config(REPO / "configs" / "tiny-albert.yaml", [*BASE, *RUNS["cycle"][2]])
    acc = account(cfg)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", body, re.M))
    assert rows["sharing plan"] == "cycle M=2 scope=block"
    assert rows["unique parameters"] == f"{acc.unique_params:,}"
    assert rows["effective parameters"].startswith(f"{acc.effective_params:,} ")
    assert rows["steps"] == "2"
    assert rows["training tokens"].startswith(f"{2 * 2 * 4 * 48:,} ")  # steps x ranks x batch x T
    assert rows["final training loss"] == f"{last['loss']:.4f}"
    assert rows["vocabulary"] == "150 pieces"
    assert f'AutoModelForMaskedLM.from_pretrained("{folder}")' in body


@pytest.mark.parity
def test_hf_round_trip_through_native(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    config = tiny_hf_config(
        "Albert",
        embedding_size=16,
        num_hidden_layers=4,
        num_hidden_groups=2,
        initializer_range=0.2,
        pad_token_id=0,
    )
    original = transformers.AlbertForPreTraining(config).eval()
    original.save_pretrained(tmp_path / "hf")
    imported = run_convert(
        "--from-hf", tmp_path / "hf", "--format", "native", "--output", tmp_path / "native"
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert load_model(tmp_path / "native").cfg.sharing.strategy == "sequence"
    back = run_convert(
        "--checkpoint",
        tmp_path / "native",
        "--tokenizer",
        tokenizer_dir,
        "--format",
        "hf",
        "--output",
        tmp_path / "back",
    )
    assert back.returncode == 0, back.stderr[-2000:]
    again = transformers.AlbertForPreTraining.from_pretrained(tmp_path / "back").eval()
    ids, mask = batch()
    with torch.no_grad():
        a = original(input_ids=ids, attention_mask=mask)
        b = again(input_ids=ids, attention_mask=mask)
    assert (a.prediction_logits - b.prediction_logits).abs().max() <= TOL
    assert (a.sop_logits - b.sop_logits).abs().max() <= TOL


@pytest.mark.parity
def test_import_and_reshare_by_the_flag_s_earlier_name(tmp_path):
    """`--share`, the earlier name of `--reshare`, still reshares."""
    torch.manual_seed(0)
    config = tiny_hf_config("Llama", num_hidden_layers=4, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    result = run_convert(
        "--from-hf",
        tmp_path / "hf",
        "--format",
        "native",
        "--output",
        tmp_path / "shared",
        "--share",
        "strategy=sequence,num_sets=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_model(tmp_path / "shared")
    assert model.plan.attention == (0, 0, 1, 1)
    expected = torch.stack([hf.model.layers[i].mlp.up_proj.weight for i in (2, 3)]).mean(0)
    torch.testing.assert_close(model.encoder.ffn[1].fn.up.weight, expected)


def one_error(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.distributed
def test_clear_errors(checkpoints, tmp_path):
    import shutil

    assert "holds no model" in one_error(
        run_convert("--checkpoint", tmp_path, "--format", "native", "--output", tmp_path / "o1")
    )
    line = one_error(
        run_convert(
            "--checkpoint",
            checkpoints["all"],
            "--tag",
            "step00000099",
            "--format",
            "native",
            "--output",
            tmp_path / "o2",
        )
    )
    assert "checkpoint tag 'step00000099' not found" in line and "step00000002" in line
    moved = tmp_path / "run"
    shutil.copytree(checkpoints["all"], moved)
    state_file = moved / "checkpoints" / "step00000002" / "run_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"]["path"] = str(tmp_path / "gone")
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)  # an edit made on purpose, sealed again
    assert "missing tokenizer" in one_error(
        run_convert("--checkpoint", moved, "--format", "hf", "--output", tmp_path / "o3")
    )
    state["config"]["data"]["path"] = json.loads(
        (checkpoints["all"] / "checkpoints" / "step00000002" / "run_state.json").read_text()
    )["config"]["data"]["path"]
    state["config"]["model"]["hidden_size"] = 128
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)
    line = one_error(
        run_convert("--checkpoint", moved, "--format", "native", "--output", tmp_path / "o4")
    )
    assert "disagrees with its weights" in line


class Payload:
    """Stands for an arbitrary object in a pickle: it must never be constructed."""


@pytest.mark.distributed
def test_checkpoints_are_never_unpickled(checkpoints, tmp_path):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(checkpoints["all"], moved)
    optim = next((moved / "checkpoints" / "step00000002").glob("*optim_states.pt"))
    torch.save({"payload": Payload()}, optim)
    line = one_error(
        run_convert("--checkpoint", moved, "--format", "native", "--output", tmp_path / "o")
    )
    assert "no checkpoint in" in line and "verifies" in line  # its SHA-256 changed
    write_manifest(optim.parent)  # whoever can plant a file can rewrite the manifest too
    line = one_error(
        run_convert("--checkpoint", moved, "--format", "native", "--output", tmp_path / "o")
    )
    assert "refusing to load" in line


@pytest.mark.distributed
def test_init_from_seeds_continued_pretraining(checkpoints, shards_dir, tmp_path):
    trained = read_checkpoint(checkpoints["all"])
    save_native(trained.state, trained.cfg, trained.tokenizer_dir, tmp_path / "native")
    out = tmp_path / "run"
    seeded = [f"--train.init_from={tmp_path / 'native'}", "--engine.zero_stage=2"]
    result = train(shards_dir, out, *seeded, "--train.max_steps=1", "--optim.lr=1e-12")
    assert "initialised from" in result.stderr
    after = read_checkpoint(out).state
    for key, tensor in trained.state.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=1e-6)
    other = run_process(
        launch_args(
            "tiny-albert.yaml", shards_dir, tmp_path / "other", "--model.hidden_size=128", *seeded
        ),
        env=env(),
    )
    assert other.returncode != 0 and "holds a different model config" in other.stderr


@pytest.mark.parity
@pytest.mark.parametrize("cls", ["BertForMaskedLM", "BertForPreTraining"])
def test_bert_imports_as_unshared_albert_with_e_equal_h(tmp_path, cls):
    torch.manual_seed(0)
    config = tiny_hf_config(
        "Bert",
        num_hidden_layers=3,
        initializer_range=0.2,  # large enough that exact and tanh GELU differ
    )
    bert = getattr(transformers, cls)(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    result = run_convert(
        "--from-hf", tmp_path / "bert", "--format", "native", "--output", tmp_path / "ours"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.hidden_act == "gelu" and ours.embeddings.project is None
    ids, mask = batch()
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    logits = expected.logits if cls == "BertForMaskedLM" else expected.prediction_logits
    assert (got.logits - logits)[mask.bool()].abs().max() <= TOL
    if cls == "BertForPreTraining":
        assert (got.sop_logits - expected.seq_relationship_logits).abs().max() <= TOL
