"""Large inputs as users hold them (pretrain.data.sources): compressed text and JSON lines,
read as the same documents as the plain files, glob patterns, and one clear error for a
file that does not decompress or a pattern that finds nothing."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
from pathlib import Path

import pytest
import zstandard

from pretrain.data import sources
from pretrain.data.preprocess import preprocess
from pretrain.data.shards import TokenShards
from pretrain.data.sources import DataError, ReadReport, iter_documents

ROWS = [
    {"text": "The king speaks.\nThe queen weeps."},
    {"text": "A storm at sea."},
    {"title": "no text here"},
    {"text": "Gold and silver rings."},
]
COMPRESS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": zstandard.ZstdCompressor().compress,
}


def documents(*inputs: Path | str) -> tuple[list[str], ReadReport]:
    report = ReadReport()
    return list(iter_documents(inputs, "text", report)), report


def jsonl() -> bytes:
    # A blank first line: the reader peeks at the first byte to tell an array from lines.
    return ("\n" + "".join(json.dumps(r) + "\n" for r in ROWS)).encode()


@pytest.mark.unit
@pytest.mark.parametrize("compression", list(COMPRESS))
def test_compressed_json_lines_read_as_the_plain_file(tmp_path, compression):
    (tmp_path / "rows.jsonl").write_bytes(jsonl())
    packed = tmp_path / f"rows.jsonl{compression}"
    packed.write_bytes(COMPRESS[compression](jsonl()))
    plain, plain_report = documents(tmp_path / "rows.jsonl")
    docs, report = documents(packed)
    assert docs == plain == [r["text"] for r in ROWS if "text" in r]
    # The same rows skipped, at the same line numbers.
    assert report.skipped == plain_report.skipped == {"missing_text_field": 1}
    assert report.first_problem["missing_text_field"] == f"{packed}:4"


@pytest.mark.unit
@pytest.mark.parametrize("compression", list(COMPRESS))
def test_compressed_text_and_json_arrays_read_as_the_plain_files(tmp_path, compression):
    text = "Now is the winter of our discontent.\nMade glorious summer.\n"
    (tmp_path / f"play.txt{compression}").write_bytes(COMPRESS[compression](text.encode()))
    array = json.dumps(ROWS).encode()
    (tmp_path / f"rows.json{compression}").write_bytes(COMPRESS[compression](array))
    docs, report = documents(
        tmp_path / f"play.txt{compression}", tmp_path / f"rows.json{compression}"
    )
    assert docs == [text, *(r["text"] for r in ROWS if "text" in r)]
    assert report.files == 2


@pytest.mark.unit
def test_a_folder_reads_compressed_files_and_counts_the_rest(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"First."))
    (tmp_path / "b.txt").write_text("Second.")
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"text\nThird.\n"))  # tables: plain only
    docs, report = documents(tmp_path)
    assert docs == ["First.", "Second."]
    assert report.ignored_files == [str(tmp_path / "c.csv.gz")]


@pytest.mark.unit
def test_glob_patterns_expand_in_sorted_order(tmp_path):
    for name, text in (("b/2.txt", "two"), ("a/1.txt.xz", "one"), ("a/deep/3.txt", "three")):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        path.write_bytes(lzma.compress(data) if name.endswith(".xz") else data)
    (tmp_path / "b" / "notes.md").write_text("not read")
    docs, _ = documents(str(tmp_path / "*" / "*.txt*"))
    assert docs == ["one", "two"]
    docs, _ = documents(str(tmp_path / "**" / "*.txt"))
    assert docs == ["three", "two"]
    docs, report = documents(str(tmp_path / "b" / "*"))
    assert docs == ["two"] and report.ignored_files == [str(tmp_path / "b" / "notes.md")]
    with pytest.raises(DataError, match=r"input pattern .*\*\.jsonl' matches no files"):
        documents(str(tmp_path / "*.jsonl"))


@pytest.mark.unit
@pytest.mark.parametrize("compression", list(COMPRESS))
def test_a_file_that_does_not_decompress_is_one_error_naming_it(tmp_path, compression):
    damaged = tmp_path / f"rows.jsonl{compression}"
    packed = COMPRESS[compression](jsonl() * 50)
    damaged.write_bytes(packed[: len(packed) // 2])  # cut off mid-stream
    with pytest.raises(DataError, match=f"cannot decompress .*rows.jsonl\\{compression} as"):
        documents(damaged)
    damaged.write_bytes(b"this is not compressed at all" * 10)
    with pytest.raises(DataError, match="fix or remove it"):
        documents(damaged)


@pytest.mark.unit
def test_a_compressed_table_named_outright_is_refused_naming_what_is_read(tmp_path):
    path = tmp_path / "rows.csv.gz"
    path.write_bytes(gzip.compress(b"text\nA row.\n"))
    with pytest.raises(DataError, match=r"unsupported type '\.csv\.gz'.*\.gz, \.bz2, \.xz, \.zst"):
        documents(path)


@pytest.mark.unit
def test_a_compressed_corpus_makes_the_same_shards(tokenizer_dir, tmp_path):
    lines = "".join(
        json.dumps({"text": f"Line {i} of the play, said the king."}) + "\n" for i in range(60)
    )
    (tmp_path / "plain.jsonl").write_text(lines)
    (tmp_path / "packed.jsonl.zst").write_bytes(COMPRESS[".zst"](lines.encode()))
    outs = {}
    for name in ("plain.jsonl", "packed.jsonl.zst"):
        preprocess([str(tmp_path / name)], tokenizer_dir, tmp_path / f"out-{name}")
        outs[name] = TokenShards(tmp_path / f"out-{name}", "train")
    plain, packed = outs.values()
    assert plain.num_documents == packed.num_documents == 60
    for doc in range(plain.num_documents):
        assert (plain.document_tokens(doc) == packed.document_tokens(doc)).all()


@pytest.mark.unit
@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_files_of_several_frames_are_read_to_the_end(tmp_path, compression, monkeypatch):
    # What parallel compressors (pigz, pzstd) and `cat a.gz b.gz` write; read in chunks
    # small enough that frames end inside them.
    monkeypatch.setattr(sources._ZstdReader, "CHUNK", 7)
    halves = jsonl()[:40], jsonl()[40:]
    path = tmp_path / f"rows.jsonl{compression}"
    path.write_bytes(b"".join(COMPRESS[compression](h) for h in halves))
    (tmp_path / "rows.jsonl").write_bytes(jsonl())
    assert documents(path)[0] == documents(tmp_path / "rows.jsonl")[0]


# -- a dataset in the local Hugging Face datasets cache ---------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A datasets cache holding `someone/tiny_corpus` (train and valid) as load_dataset
    leaves a downloaded Hub dataset: its Arrow files under NAMESPACE___NAME/CONFIG/..."""
    import datasets

    rows = {"train": ["one", "two", "three"], "valid": ["held out"]}
    files = {}
    for split, texts in rows.items():
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build = tmp_path / "build"
    datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()}, cache_dir=build)
    (prepared,) = [p for p in build.glob("json/*/*/*") if p.is_dir()]
    cache = tmp_path / "hub"
    home = cache / "someone___tiny_corpus" / "default" / "0.0.0" / "abc123"
    shutil.copytree(prepared, home)
    for arrow in home.glob("json-*.arrow"):
        arrow.rename(home / arrow.name.replace("json-", "tiny_corpus-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.mark.unit
@pytest.mark.parametrize("streaming", [False, True])
def test_a_cached_hub_dataset_reads_by_name_and_split(hub_cache, streaming, monkeypatch):
    monkeypatch.setattr(sources, "ROWS_PER_READ", 2)  # rows read in several batches
    report = ReadReport()
    docs = list(iter_documents(["hf:someone/tiny_corpus"], "text", report, streaming))
    assert docs == ["one", "two", "three"] and report.documents == 3
    docs = list(iter_documents(["hf:someone/tiny_corpus:default@valid"], "text", report, streaming))
    assert docs == ["held out"]


@pytest.mark.unit
def test_a_hub_dataset_not_in_the_cache_is_one_error_saying_how_to_get_it(hub_cache):
    with pytest.raises(DataError, match=r"hf:someone/other@train: not readable from the local"):
        documents("hf:someone/other")
    with pytest.raises(
        DataError, match=r"download it first .*load_dataset\('someone/tiny_corpus', 'nope'\)"
    ):
        documents("hf:someone/tiny_corpus:nope")
    with pytest.raises(DataError, match="Unknown split"):
        documents("hf:someone/tiny_corpus@test")
    with pytest.raises(DataError, match=r"--text-field 'body' not found in hf:someone/tiny_corpus"):
        list(iter_documents(["hf:someone/tiny_corpus"], "body", ReadReport()))
    with pytest.raises(DataError, match=r"expected hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        documents("hf:someone/tiny_corpus@")
