"""tools/finetune.py end to end on CPU: a tiny random HF ALBERT learns a cue-word task."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from helpers import WORDS, run_process, tiny_hf_config

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
