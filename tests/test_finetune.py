"""tools/finetune.py: a tiny random HF ALBERT learns a cue-word task end to end on CPU;
layer-wise learning rates, freezing and the tie penalty on tiny HF models in-process."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import WORDS, run_process, tiny_hf_config

from pretrain import finetune as ft
from pretrain.errors import UserError

SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
}
CUES = ("sword", "crown", "gold")
PLAIN = [w for w in WORDS if w not in CUES]


def albert_tokenizer(spiece: Path) -> transformers.AlbertTokenizer:
    """Our SentencePiece model as an HF ALBERT tokenizer.

    transformers 5 ignores `vocab_file=` in the constructor (it builds a 5-piece
    placeholder vocab), so the pieces and the NFKC charsmap are passed explicitly.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spiece.read_bytes())
    return transformers.AlbertTokenizer(
        vocab=[(p.piece, p.score) for p in proto.pieces],
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        do_lower_case=False,  # the charsmap already folds case when the model was lowercased
        keep_accents=True,
        **SPECIAL_TOKENS,
    )


@pytest.fixture(scope="module")
def hf_albert(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random HF ALBERT folder with our tokenizer."""
    out = tmp_path_factory.mktemp("hf_albert")
    albert_tokenizer(tokenizer_dir / "spiece.model").save_pretrained(out)
    config = tiny_hf_config(
        "Albert", embedding_size=16, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0
    )
    transformers.set_seed(0)
    transformers.AlbertForMaskedLM(config).save_pretrained(out)
    return out


def sentence(rng: np.random.Generator, cue: bool) -> str:
    words = list(rng.choice(PLAIN, size=int(rng.integers(5, 10))))
    if cue:
        words[int(rng.integers(len(words)))] = str(rng.choice(CUES))
    return " ".join(words).capitalize() + "."


def rows(n: int, seed: int) -> list[dict]:
    """Balanced: label "cue" when the sentence holds one of CUES, else "plain"."""
    rng = np.random.default_rng(seed)
    labels = ["cue", "plain"] * (n // 2)
    return [{"text": sentence(rng, y == "cue"), "label": y} for y in labels]


def write_csv(path: Path, data: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    return path


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path


def finetune(model: Path, train: Path, evaluation: Path, output: Path, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", str(model), "--train", str(train), "--eval", str(evaluation)]
    return run_process(
        [sys.executable, "tools/finetune.py", *args, "--output", str(output), *extra], env=env
    )


@pytest.mark.parity
def test_tokenizer_round_trips_offline_with_sentencepiece_ids(hf_albert, tokenizer_dir):
    from pretrain.data.tokenizer import Tokenizer

    ours = Tokenizer(tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_albert, local_files_only=True)
    assert type(tok).__name__ == "AlbertTokenizer"
    special = ("pad", "unk", "cls", "sep", "mask")
    assert [getattr(tok, f"{name}_token_id") for name in special] == [
        ours.id(name) for name in special
    ]
    texts = ["The king  speaks, to the Queen!", "Ünïcödé ﬁ ｆｕｌｌ width", "  gold\tcrown\n"]
    for text, ids in zip(texts, ours.encode(texts), strict=True):
        assert tok(text)["input_ids"] == [ours.id("cls"), *ids, ours.id("sep")]
    # The one known difference: HF matches special tokens inside raw text, SentencePiece
    # keeps a literal "[MASK]" as text (control symbols never come out of raw text).
    assert ours.id("mask") in tok("the [MASK] king")["input_ids"]
    assert ours.id("mask") not in ours.encode(["the [MASK] king"])[0]


@pytest.mark.e2e
def test_finetune_learns_cue_words(hf_albert, tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(320, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows(100, seed=2))
    out = tmp_path / "out"
    result = finetune(
        hf_albert, train, evaluation, out, "--epochs", "10", "--lr", "2e-3", "--batch-size", "32"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [s for s in result.stdout.splitlines() if s.startswith("eval accuracy:")]
    assert len(line) == 1, result.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["n"] == 100 and results["chance"] == pytest.approx(0.5)
    assert results["accuracy"] >= results["chance"] + 0.2, line

    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, local_files_only=True
    ).eval()
    assert model.config.id2label == {0: "cue", 1: "plain"}
    batch = tok(
        ["The king holds the sword.", "The king holds the ring."], return_tensors="pt", padding=True
    )
    predicted = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["cue", "plain"]


@pytest.mark.e2e
def test_missing_label_column_names_the_columns(hf_albert, tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": "a b", "y": 0}, {"text": "c", "y": 1}])
    result = finetune(hf_albert, train, train, tmp_path / "out")
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert "'label'" in errors[0] and "text, y" in errors[0] and "--label-field" in errors[0]


@pytest.mark.e2e
def test_unseen_eval_label_is_one_error_line(hf_albert, tmp_path):
    train = write_csv(
        tmp_path / "train.csv", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    )
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": 2}])
    result = finetune(hf_albert, train, evaluation, tmp_path / "out")
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert "2" in errors[0] and "training labels: 0, 1" in errors[0]


# -- layer-wise learning rates, freezing, tie penalty (in-process, tiny HF models) -----------


def classifier(kind: str, layers: int, **overrides) -> transformers.PreTrainedModel:
    config = tiny_hf_config(
        kind, num_hidden_layers=layers, num_labels=2, pad_token_id=0, **overrides
    )
    transformers.set_seed(0)
    return getattr(transformers, f"{kind}ForSequenceClassification")(config)


def flags(*extra: str):
    required = ["--model", "m", "--train", "t.csv", "--eval", "e.csv", "--output", "o"]
    return ft.parse_args([*required, *extra])


def lr_of(groups: list[dict]) -> dict[int, float]:
    """id(parameter) -> its group's lr; fails if a parameter is in two groups."""
    lrs = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in lrs, "a parameter in two groups"
            lrs[id(param)] = group["lr"]
    return lrs


def train_step(model, groups) -> None:
    ids = torch.randint(5, 150, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    torch.optim.AdamW(groups).step()


@pytest.mark.unit
def test_layer_decay_gives_each_depth_its_lr_and_each_parameter_one_group():
    model = classifier("Llama", layers=3)
    groups = ft.param_groups(model, ft.layout(model, "--layer-decay"), lr=1.0, decay=0.5)
    lrs = lr_of(groups)
    expected = {"model.embed_tokens.": 0.5**4, "model.norm.": 1.0, "score.": 1.0}
    expected.update({f"model.layers.{i}.": 0.5 ** (3 - i) for i in range(3)})
    for name, param in model.named_parameters():
        (lr,) = [lr for prefix, lr in expected.items() if name.startswith(prefix)]
        assert lrs.pop(id(param)) == lr, name
    assert not lrs  # nothing else is in a group
    assert [g["name"] for g in groups] == ["embeddings", "layer 0", "layer 1", "layer 2", "head"]
    # without the flags: one group at lr, every parameter in it
    (group,) = ft.param_groups(model, None, lr=1e-3, decay=1.0)
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(model.parameters()))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("groups", "group_lrs"),
    [(1, {0: 0.5}), (2, {0: 0.5**3, 1: 0.5}), (4, {g: 0.5 ** (4 - g) for g in range(4)})],
)
def test_a_shared_albert_group_trains_at_the_lr_of_its_highest_use(groups, group_lrs):
    model = classifier("Albert", layers=4, num_hidden_groups=groups, embedding_size=16)
    lrs = lr_of(ft.param_groups(model, ft.layout(model, "--layer-decay"), lr=1.0, decay=0.5))
    for name, param in model.named_parameters():
        if name.startswith(("albert.embeddings.", "albert.encoder.embedding_hidden_mapping_in.")):
            assert lrs[id(param)] == 0.5**5, name
        elif name.startswith("albert.encoder.albert_layer_groups."):
            assert lrs[id(param)] == group_lrs[int(name.split(".")[3])], name
        else:
            assert name.startswith(("albert.pooler.", "classifier.")) and lrs[id(param)] == 1.0
    assert len(lrs) == len(list(model.parameters()))


@pytest.mark.unit
def test_frozen_parameters_get_no_gradient_and_do_not_change():
    model = classifier("Bert", layers=3)
    where = ft.layout(model, "--freeze-layers")
    lines = ft.freeze(model, where, embeddings=True, layers=2)
    assert lines[:3] == ["frozen: embeddings", "frozen: layer 0", "frozen: layer 1"]
    trained = sum(p.numel() for n, p in model.named_parameters() if where.depth[n] >= 2)
    assert (
        lines[-1]
        == f"training {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = ft.param_groups(model, where, lr=1e-2, decay=0.9)
    assert [g["name"] for g in groups] == ["layer 2", "head"]
    train_step(model, groups)
    for name, param in model.named_parameters():
        frozen = name.startswith(
            ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")
        )
        assert param.requires_grad is not frozen, name
        if frozen:
            assert param.grad is None and torch.equal(param, before[name]), name
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
    layer2 = "bert.encoder.layer.2.attention.self.query.weight"
    assert not torch.equal(dict(model.named_parameters())[layer2], before[layer2])


@pytest.mark.unit
def test_a_shared_set_is_frozen_only_when_every_layer_that_runs_it_is():
    # ALBERT, 4 layers in 2 groups: group 0 runs layers 0 and 1, group 1 layers 2 and 3.
    model = classifier("Albert", layers=4, num_hidden_groups=2, embedding_size=16)
    where = ft.layout(model, "--freeze-layers")
    lines = ft.freeze(model, where, embeddings=False, layers=1)
    assert lines[0] == "trainable: layers 0-1 (shared set), also run by a layer above the first 1"
    assert all(p.requires_grad for p in model.parameters())
    groups = ft.param_groups(model, where, lr=1e-2, decay=1.0)
    before = (
        model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.detach().clone()
    )
    train_step(model, groups)
    assert not torch.equal(
        model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight, before
    )

    lines = ft.freeze(model, where, embeddings=False, layers=2)
    assert lines[0] == "frozen: layers 0-1 (shared set)"
    for name, param in model.named_parameters():
        assert param.requires_grad is not name.startswith(
            "albert.encoder.albert_layer_groups.0."
        ), name

    shared = classifier("Albert", layers=4, num_hidden_groups=1, embedding_size=16)
    ft.freeze(shared, ft.layout(shared, "--freeze-layers"), embeddings=False, layers=3)
    assert all(p.requires_grad for p in shared.parameters())
    ft.freeze(shared, ft.layout(shared, "--freeze-layers"), embeddings=False, layers=4)
    assert not any(
        p.requires_grad for n, p in shared.named_parameters() if ".albert_layer_groups." in n
    )


def tied_llama(layers: int) -> transformers.PreTrainedModel:
    """A Llama whose layers all hold layer 0's weights: an unrolled export of pure sharing."""
    model = classifier("Llama", layers=layers)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            for mine, first in zip(
                layer.parameters(), model.model.layers[0].parameters(), strict=True
            ):
                mine.copy_(first)
    return model


@pytest.mark.unit
def test_tie_penalty_pulls_the_layers_of_a_tie_set_together():
    model = tied_llama(layers=4)
    where = ft.layout(model, "--tie-penalty")
    ties = ft.tie_groups(model, where, ft.parse_tie_sets(None, 4))
    assert len(ties) == len(list(model.model.layers[0].parameters()))  # each layer parameter
    assert ft.tie_penalty(ties).item() == 0.0
    q = [layer.self_attn.q_proj.weight for layer in model.model.layers]
    with torch.no_grad():
        q[3].add_(0.1)
    mean = torch.stack(q).mean(0)
    expected = sum((w - mean).square().sum() for w in q)
    torch.testing.assert_close(ft.tie_penalty(ties), expected)
    spread = expected.item()
    groups = ft.param_groups(model, where, lr=1e-2, decay=1.0)
    optimizer = torch.optim.SGD(groups)
    ft.tie_penalty(ties).backward()
    optimizer.step()
    assert ft.tie_penalty(ties).item() < spread  # the penalty's gradient ties them again

    # two tie sets: layers 0-1 and 2-3 agree within their set, not across
    pairs = classifier("Llama", layers=4)
    with torch.no_grad():
        for a, b in ((0, 1), (2, 3)):
            for mine, first in zip(
                pairs.model.layers[b].parameters(), pairs.model.layers[a].parameters(), strict=True
            ):
                mine.copy_(first)
    sets = ft.parse_tie_sets("0,0,1,1", 4)
    assert ft.tie_penalty(ft.tie_groups(pairs, ft.layout(pairs, "x"), sets)).item() == 0.0
    assert ft.tie_penalty(ft.tie_groups(pairs, ft.layout(pairs, "x"), [0] * 4)).item() > 0.0
    assert ft.parse_tie_sets("0,-,0,1", 4) == [0, None, 0, 1]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--layer-decay", "0"], "--layer-decay 0.0 must be in (0, 1]"),
        (["--layer-decay", "1.5"], "--layer-decay 1.5 must be in (0, 1]"),
        (["--freeze-layers", "-1"], "--freeze-layers -1 must be 0 or more"),
        (["--tie-penalty", "-0.1"], "--tie-penalty -0.1 must be 0 or more"),
        (["--tie-sets", "0,0"], "pass --tie-penalty W"),
    ],
)
def test_bad_flag_values_are_one_error_naming_the_fix(extra, words):
    with pytest.raises(UserError, match=re.escape(words)):
        ft.check_args(flags(*extra))


@pytest.mark.unit
def test_what_the_model_cannot_take_is_one_error():
    model = classifier("Bert", layers=2)
    with pytest.raises(
        UserError,
        match=re.escape("--freeze-layers 3: the model has 2 layer applications; freeze at most 2"),
    ):
        ft.freeze(model, ft.layout(model, "--freeze-layers"), embeddings=False, layers=3)
    with pytest.raises(UserError, match=re.escape("give the set of each of the 2 layers")):
        ft.parse_tie_sets("0,0,1", 2)
    shared = classifier("Albert", layers=4, num_hidden_groups=1, embedding_size=16)
    with pytest.raises(UserError, match="nothing to tie"):
        ft.tie_groups(shared, ft.layout(shared, "--tie-penalty"), [0] * 4)
    other = transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(vocab_size=150, dim=32, hidden_dim=64, n_layers=2, n_heads=2)
    )
    with pytest.raises(UserError, match="--layer-decay needs a model whose layers this tool knows"):
        ft.layout(other, "--layer-decay")


@pytest.mark.e2e
def test_finetune_with_decay_and_freezing_keeps_the_frozen_weights(hf_albert, tmp_path):
    # hf_albert: 2 layers running ALBERT's one group, so freezing layer 0 keeps it trainable
    train = write_csv(tmp_path / "train.csv", rows(32, seed=1))
    out = tmp_path / "out"
    extra = ["--epochs", "1", "--batch-size", "16", "--layer-decay", "0.8"]
    result = finetune(
        hf_albert, train, train, out, *extra, "--freeze-embeddings", "--freeze-layers", "1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "frozen: embeddings" in lines
    assert "trainable: layers 0-1 (shared set), also run by a layer above the first 1" in lines
    assert "lr: layers 0-1 (shared set) 4e-05, head 5e-05" in lines
    base = transformers.AlbertForMaskedLM.from_pretrained(hf_albert, local_files_only=True).albert
    tuned = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, local_files_only=True
    ).albert
    for name in ("embeddings.word_embeddings.weight", "encoder.embedding_hidden_mapping_in.weight"):
        assert torch.equal(tuned.get_parameter(name), base.get_parameter(name)), name
    ffn = "encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"
    assert not torch.equal(tuned.get_parameter(ffn), base.get_parameter(ffn))


@pytest.mark.e2e
def test_bad_layer_decay_is_one_error_line(hf_albert, tmp_path):
    train = write_csv(
        tmp_path / "train.csv", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    )
    result = finetune(hf_albert, train, train, tmp_path / "out", "--layer-decay", "1.2")
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --layer-decay 1.2 must be in (0, 1]")
    assert "0.8 lowers each layer below the head" in errors[0], result.stderr


@pytest.mark.unit
def test_the_trainer_adds_the_penalty_to_the_training_loss_only(tmp_path):
    model = classifier("Llama", layers=2)
    where = ft.layout(model, "--tie-penalty")
    ties = ft.tie_groups(model, where, [0, 0])
    trainer = ft.FineTuner(
        groups=ft.param_groups(model, where, lr=1e-3, decay=0.5),
        penalty=lambda: 2.0 * ft.tie_penalty(ties),
        model=model,
        args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
    )
    inputs = {"input_ids": torch.randint(5, 150, (2, 8)), "labels": torch.tensor([0, 1])}
    model.train()
    plain = model(**inputs).loss
    torch.testing.assert_close(
        trainer.compute_loss(model, inputs), plain + 2.0 * ft.tie_penalty(ties)
    )
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, inputs), model(**inputs).loss)
    optimizer = trainer.create_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [
        1e-3 * 0.5**3,
        1e-3 * 0.5**2,
        1e-3 * 0.5,
        1e-3,
    ]


@pytest.mark.e2e
def test_tie_penalty_pulls_an_unrolled_export_together(hf_albert, tmp_path):
    # ALBERT with one group per layer: how a relaxed model exports
    unrolled = tmp_path / "unrolled"
    transformers.AutoTokenizer.from_pretrained(hf_albert, local_files_only=True).save_pretrained(
        unrolled
    )
    config = tiny_hf_config(
        "Albert", embedding_size=16, num_hidden_layers=2, num_hidden_groups=2, pad_token_id=0
    )
    transformers.set_seed(0)
    transformers.AlbertForMaskedLM(config).save_pretrained(unrolled)
    train = write_csv(tmp_path / "train.csv", rows(32, seed=1))
    out = tmp_path / "out"
    extra = ["--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--tie-penalty", "100"]
    result = finetune(unrolled, train, train, out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tie penalty 100 on 16 parameters tied across layers 0-1" in result.stdout

    def spread(model) -> float:
        groups = model.albert.encoder.albert_layer_groups
        return sum(
            (a - b).square().sum().item()
            for a, b in zip(groups[0].parameters(), groups[1].parameters(), strict=True)
        )

    before = transformers.AutoModelForSequenceClassification.from_pretrained(
        unrolled, local_files_only=True
    )
    after = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, local_files_only=True
    )
    assert spread(after) < 0.9 * spread(before)
