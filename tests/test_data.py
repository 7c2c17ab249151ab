"""Tokenizer training, preprocessing into shards, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import REPO

from pretrain.data.preprocess import METADATA, preprocess
from pretrain.data.samples import SOPSamples
from pretrain.data.shards import TokenShards
from pretrain.data.sources import DataError, ReadReport, iter_documents
from pretrain.data.tokenizer import (
    EARLIER_INFO_FILE,
    INFO_FILE,
    MODEL_FILE,
    Tokenizer,
    train_tokenizer,
)


def files_of(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- tokenizer -----------------------------------------------------------------------


@pytest.mark.unit
def test_tokenizer_has_fixed_special_ids(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    assert tok.info.special_ids == {
        "pad": 0,
        "unk": 1,
        "bos": 2,
        "eos": 3,
        "cls": 4,
        "sep": 5,
        "mask": 6,
    }
    pieces = [tok.sp.id_to_piece(i) for i in range(7)]
    assert pieces == ["[PAD]", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
    # Control symbols never come out of raw text.
    assert 6 not in tok.sp.encode("a [MASK] b")
    assert tok.word_start[tok.sp.piece_to_id("\u2581king")]


@pytest.mark.unit
def test_tokenizer_training_is_deterministic_and_checksummed(corpus_dir, tmp_path):
    infos = []
    for name in ("a", "b"):
        docs = iter_documents([corpus_dir], "text", ReadReport())
        infos.append(train_tokenizer(docs, tmp_path / name, vocab_size=140, model_type="bpe"))
    assert infos[0].checksum == infos[1].checksum
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()
    assert json.loads((tmp_path / "a" / INFO_FILE).read_text())["model_type"] == "bpe"


@pytest.mark.unit
def test_a_tokenizer_folder_of_the_earlier_metadata_name_still_loads(tokenizer_dir, tmp_path):
    """Folders written when our metadata was `tokenizer.json` load; a Hugging Face
    `tokenizer.json` (its fast tokenizer, no checksum) is not taken for ours."""
    earlier = shutil.copytree(tokenizer_dir, tmp_path / "earlier")
    (earlier / INFO_FILE).rename(earlier / EARLIER_INFO_FILE)
    assert Tokenizer(earlier).info == Tokenizer(tokenizer_dir).info
    (earlier / EARLIER_INFO_FILE).write_text(json.dumps({"version": "1.0", "model": {}}))
    with pytest.raises(DataError, match=f"has no {INFO_FILE}"):
        Tokenizer(earlier)


@pytest.mark.unit
def test_tokenizer_lowercase_and_sampling(corpus_dir, tmp_path):
    docs = iter_documents([corpus_dir], "text", ReadReport())
    train_tokenizer(docs, tmp_path, vocab_size=80, lowercase=True, input_sentence_size=200)
    tok = Tokenizer(tmp_path)
    assert tok.sp.encode("The KING") == tok.sp.encode("the king")


@pytest.mark.e2e
def test_tokenizer_cli(corpus_dir, tmp_path, cli):
    out = tmp_path / "tok"
    args = ["tokenizer/train.py", "--input", str(corpus_dir), "--vocab-size", "150"]
    result = cli(*args, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "read 24 documents from 24 files" in result.stdout
    again = cli(*args, "--output", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {out} already holds a tokenizer; choose another --output or delete it first"
    ]


@pytest.mark.unit
def test_tampered_tokenizer_is_refused(tokenizer_dir, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    (copy / MODEL_FILE).write_bytes((copy / MODEL_FILE).read_bytes() + b"x")
    with pytest.raises(DataError, match="does not match the checksum"):
        Tokenizer(copy)


# --- preprocessing -------------------------------------------------------------------


@pytest.mark.unit
def test_preprocess_writes_shards_and_metadata(shards_dir, tokenizer_dir):
    meta = json.loads((shards_dir / METADATA).read_text())
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["checksum"] == Tokenizer(tokenizer_dir).info.checksum
    assert meta["splits"]["train"]["documents"] == 21
    assert meta["splits"]["valid"]["documents"] == 3
    assert meta["read"] == {
        "documents": 24,
        "files": 24,
        "first_problem": {},
        "ignored_files": [],
        "replaced_utf8": 0,
        "decoded": {},
        "skipped": {},
    }
    shards = TokenShards(shards_dir, "train")
    assert shards.num_documents == 21
    assert int(shards.document_lengths().sum()) == meta["splits"]["train"]["tokens"]
    # The data folder carries the tokenizer it was made with.
    assert Tokenizer(shards_dir / "tokenizer").info.checksum == meta["tokenizer"]["checksum"]


@pytest.mark.unit
def test_shards_hold_the_tokenized_text(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "data"
    preprocess([str(corpus_dir / "doc00.txt")], tokenizer_dir, out)
    shards = TokenShards(out)
    tok = Tokenizer(tokenizer_dir)
    lines = (corpus_dir / "doc00.txt").read_text().splitlines()
    expected = [np.array(ids) for ids in tok.encode(lines)]
    got = shards.sentences(0, 0, len(lines))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.unit
def test_preprocess_is_byte_identical_across_runs(corpus_dir, tokenizer_dir, tmp_path):
    preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "a", held_out=0.2, shard_tokens=3000)
    preprocess(
        [str(corpus_dir)],
        tokenizer_dir,
        tmp_path / "b",
        held_out=0.2,
        shard_tokens=3000,
        num_proc=2,
    )
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert sum(name.endswith(".bin") for name in a) > 2  # several shards
    assert a == b


@pytest.mark.unit
def test_small_shards_split_at_document_boundaries(corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "data"
    meta = preprocess([str(corpus_dir)], tokenizer_dir, out, shard_tokens=2000)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert sum(s["documents"] for s in shards) == 24
    reader = TokenShards(out)
    whole = np.concatenate([reader.document_tokens(d) for d in range(24)])
    assert len(whole) == meta["splits"]["train"]["tokens"]


@pytest.mark.unit
def test_structured_inputs(tokenizer_dir, tmp_path):
    import datasets

    texts = ["The king speaks.\nThe queen weeps.", "A storm at sea.", "Gold and silver rings."]
    (tmp_path / "rows.csv").write_text(
        "id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts))
    )
    datasets.Dataset.from_dict({"body": texts}).to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(tmp_path / "saved")
    (tmp_path / "rows.json").write_text(json.dumps([{"body": t} for t in texts]))
    for name in ("rows.csv", "rows.parquet", "saved", "rows.json"):
        meta = preprocess(
            [str(tmp_path / name)], tokenizer_dir, tmp_path / f"out-{name}", text_field="body"
        )
        assert meta["splits"]["train"]["documents"] == 3, name
        assert meta["splits"]["train"]["sentences"] == 4, name


# --- bad input -----------------------------------------------------------------------


def run_preprocess(cli, inputs, tokenizer_dir, output, *extra):
    return cli(
        "tools/preprocess.py",
        "--input",
        *map(str, inputs),
        "--tokenizer",
        str(tokenizer_dir),
        "--output",
        str(output),
        *extra,
    )


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_nothing_left(parent, output):
    assert not output.exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.e2e
def test_empty_corpus_fails_cleanly(tokenizer_dir, tmp_path, cli):
    corpus = tmp_path / "empty"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.txt").write_text("\n   \n")
    out = tmp_path / "out"
    line = one_error_line(run_preprocess(cli, [corpus], tokenizer_dir, out))
    assert "no text found in the inputs" in line and "skipped 2 (empty" in line
    assert_nothing_left(tmp_path, out)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    line = one_error_line(run_preprocess(cli, [nothing], tokenizer_dir, out))
    assert "no input files found" in line


@pytest.mark.e2e
def test_unknown_text_field_names_the_fields(tokenizer_dir, tmp_path, cli):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "The king speaks."}\n{"body": "The queen weeps."}\n')
    out = tmp_path / "out"
    line = one_error_line(run_preprocess(cli, [path], tokenizer_dir, out))
    assert f"--text-field 'text' not found in {path} (fields: body); pass --text-field NAME" in line
    assert_nothing_left(tmp_path, out)
    csv = tmp_path / "rows.csv"
    csv.write_text("id,body\n1,hello\n")
    line = one_error_line(run_preprocess(cli, [csv], tokenizer_dir, out, "--text-field", "txt"))
    assert "--text-field 'txt' not found" in line and "(fields: body, id)" in line


@pytest.mark.e2e
def test_malformed_json_lines_are_skipped_and_counted(tokenizer_dir, tmp_path, cli):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"text": "The king speaks."}\n'
        '{"text": "broken\n'
        '["not", "an object"]\n'
        '{"title": "no text here"}\n'
        '{"text": null}\n'
        '{"text": 42}\n'
        '{"text": "   "}\n'
        "\n"
        '{"text": "The queen weeps."}\n'
    )
    out = tmp_path / "out"
    result = run_preprocess(cli, [path], tokenizer_dir, out)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / METADATA).read_text())
    assert meta["read"]["skipped"] == {
        "empty": 1,
        "malformed_json": 1,
        "missing_text_field": 1,
        "non_string_text": 1,
        "not_an_object": 1,
        "null_text": 1,
    }
    assert meta["read"]["first_problem"]["malformed_json"] == f"{path}:2"
    assert meta["splits"]["train"]["documents"] == 2
    assert f"skipped 1 rows: malformed_json (first at {path}:2)" in result.stdout


@pytest.mark.e2e
def test_non_utf8_bytes_are_replaced_and_counted(tokenizer_dir, tmp_path, cli):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("The king speaks.\nThe queen weeps.")
    (corpus / "bad.txt").write_bytes(b"The king \xff\xfe speaks.\nA storm at sea.")
    (corpus / "notes.md").write_text("ignored but reported")
    out = tmp_path / "out"
    result = run_preprocess(cli, [corpus], tokenizer_dir, out)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / METADATA).read_text())
    assert meta["read"]["replaced_utf8"] == 1
    assert meta["read"]["ignored_files"] == [str(corpus / "notes.md")]
    assert meta["splits"]["train"]["documents"] == 2
    assert "1 documents had non-UTF-8 bytes replaced" in result.stdout


@pytest.mark.unit
def test_shard_size_disagreeing_with_index(shards_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(shards_dir, copy)
    shard = copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"holds \d+ bytes but its index says \d+"):
        TokenShards(copy)


@pytest.mark.unit
def test_shards_from_another_tokenizer(shards_dir, corpus_dir, tmp_path):
    other = tmp_path / "tok"
    docs = iter_documents([corpus_dir], "text", ReadReport())
    train_tokenizer(docs, other, vocab_size=120)
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        TokenShards(shards_dir, tokenizer_checksum=Tokenizer(other).info.checksum)
    from pretrain.config import load_config
    from pretrain.data.loader import PretrainDataset

    cfg = load_config(
        REPO / "configs" / "tiny-albert.yaml",
        {"data.path": str(shards_dir), "data.tokenizer": str(other)},
    )
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        PretrainDataset(cfg)


@pytest.mark.e2e
def test_output_holding_different_data_is_left_alone(
    corpus_dir, shards_dir, tokenizer_dir, tmp_path, cli
):
    out = tmp_path / "data"
    shutil.copytree(shards_dir, out)
    SOPSamples(TokenShards(out), 48, 0.1, 0)  # trained on: its sample index/ is there too
    before = files_of(out)
    line = one_error_line(run_preprocess(cli, [corpus_dir / "doc00.txt"], tokenizer_dir, out))
    assert "already holds different preprocessed data" in line
    assert files_of(out) == before
    # The same command again is fine: identical output, nothing rewritten.
    same = run_preprocess(cli, [corpus_dir], tokenizer_dir, out, "--held-out", "3")
    assert same.returncode == 0, same.stderr
    assert files_of(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    line = one_error_line(run_preprocess(cli, [corpus_dir], tokenizer_dir, foreign))
    assert "already holds other files" in line
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.e2e
def test_missing_tokenizer_and_inputs(corpus_dir, tokenizer_dir, tmp_path, cli):
    line = one_error_line(run_preprocess(cli, [corpus_dir], tmp_path / "none", tmp_path / "o"))
    assert "has no spiece.model" in line
    line = one_error_line(
        run_preprocess(cli, [tmp_path / "nope.txt"], tokenizer_dir, tmp_path / "o")
    )
    assert "does not exist" in line


@pytest.mark.unit
def test_held_out_must_leave_training_data(corpus_dir, tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="leaves none for training"):
        preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "o", held_out=24)


@pytest.mark.e2e
def test_prepare_corpus(tmp_path, cli):
    result = cli("tools/prepare_corpus.py", "--output", str(tmp_path / "shakespeare"))
    assert result.returncode == 0, result.stderr
    texts = sorted((tmp_path / "shakespeare").glob("*.txt"))
    assert len(texts) == 78
    assert sum(p.stat().st_size for p in texts) > 9_000_000
