"""Preprocessing across nodes: parts of the input files written apart, then merged into the
folder one process would have written; the held-out choice made per document by its text."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from test_data import assert_nothing_left, files_of, one_error_line, run_preprocess

from pretrain.data.preprocess import METADATA, HeldOut, merge, preprocess
from pretrain.data.shards import TokenShards
from pretrain.data.sources import DataError, Part, part_bounds

SMALL = {"held_out": 0.2, "shard_tokens": 3000}


def write_parts(corpus_dir, tokenizer_dir, root, count, **options) -> list:
    folders = [root / f"part-{i}" for i in range(count)]
    for i, folder in enumerate(folders):
        preprocess([str(corpus_dir)], tokenizer_dir, folder, part=Part(i, count), **options)
    return folders


@pytest.fixture(scope="module")
def one_process(corpus_dir, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "data"
    preprocess([str(corpus_dir)], tokenizer_dir, out, **SMALL)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("count", [2, 5])
def test_merged_parts_equal_one_process_byte_for_byte(
    corpus_dir, tokenizer_dir, one_process, tmp_path, count
):
    parts = write_parts(corpus_dir, tokenizer_dir, tmp_path, count, **SMALL)
    metas = [json.loads((p / METADATA).read_text()) for p in parts]
    assert sum(m["read"]["files"] for m in metas) == 24
    assert all(m["read"]["files"] >= 1 for m in metas)
    merged = merge(list(reversed(parts)), tmp_path / "merged")  # any order of the folders
    assert files_of(tmp_path / "merged") == files_of(one_process)
    assert "part" not in merged
    if count == 5:  # more shards in the parts than in the whole: the merge re-packs them
        part_shards = sum(len(m["splits"]["train"]["shards"]) for m in metas)
        assert part_shards > len(merged["splits"]["train"]["shards"])


@pytest.mark.unit
def test_each_document_is_held_out_by_its_text_alone(corpus_dir, one_process):
    rule = HeldOut.choose(SMALL["held_out"], 1234, count_documents=None)
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    chosen = [rule(t) for t in texts]
    assert 0 < sum(chosen) < len(texts)
    shards = TokenShards(one_process, "valid")
    assert shards.num_documents == sum(chosen)
    reordered = HeldOut.choose(SMALL["held_out"], 1234, count_documents=None)
    assert [reordered(t) for t in reversed(texts)] == chosen[::-1]
    other_seed = HeldOut.choose(SMALL["held_out"], 99, count_documents=None)
    assert [other_seed(t) for t in texts] != chosen


@pytest.mark.unit
def test_a_count_holds_out_exactly_that_many(corpus_dir, tokenizer_dir, tmp_path):
    meta = preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "d", held_out=5)
    assert meta["splits"]["valid"]["documents"] == 5
    assert meta["splits"]["train"]["documents"] == 19


@pytest.mark.unit
def test_a_fraction_that_holds_out_nothing_is_an_error(corpus_dir, tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="chose none of the 24 documents"):
        preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "d", held_out=1e-9)
    assert_nothing_left(tmp_path, tmp_path / "d")


@pytest.mark.unit
def test_parts_refuse_what_they_cannot_split(corpus_dir, tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="is a count, which needs the whole corpus"):
        preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "p", held_out=3, part=Part(0, 2))
    with pytest.raises(DataError, match="needs at least as many input files"):
        preprocess([str(corpus_dir / "doc00.txt")], tokenizer_dir, tmp_path / "p", part=Part(0, 2))
    with pytest.raises(DataError, match="give 0 <= part < num-parts"):
        Part(2, 2)
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_merge_needs_every_part_of_one_command_once(corpus_dir, tokenizer_dir, tmp_path):
    parts = write_parts(corpus_dir, tokenizer_dir, tmp_path / "a", 3, **SMALL)
    out = tmp_path / "merged"
    with pytest.raises(DataError, match=r"got parts \[0, 2\] \(missing \[1\]\)"):
        merge([parts[0], parts[2]], out)
    with pytest.raises(DataError, match=r"got parts \[0, 1, 1, 2\]"):
        merge([*parts, parts[1]], out)
    other = tmp_path / "b" / "part-1"
    preprocess([str(corpus_dir)], tokenizer_dir, other, part=Part(1, 3), **SMALL | {"seed": 7})
    with pytest.raises(DataError, match="has seed 7"):
        merge([parts[0], other, parts[2]], out)
    with pytest.raises(DataError, match="is not a preprocessed part"):
        merge([corpus_dir], out)
    assert_nothing_left(tmp_path, out)


@pytest.mark.unit
def test_merge_counts_what_every_part_skipped(tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(3):
        rows = [json.dumps({"text": f"Row {i} of file {f} is here."}) for i in range(3)]
        lines = [*rows, "{broken", json.dumps({"text": "   "})]
        (corpus / f"f{f}.jsonl").write_text("\n".join(lines) + "\n")
    whole = preprocess([str(corpus)], tokenizer_dir, tmp_path / "whole")
    parts = write_parts(corpus, tokenizer_dir, tmp_path, 3)
    merged = merge(parts, tmp_path / "merged")
    assert merged["read"] == whole["read"]
    assert merged["read"]["skipped"] == {"empty": 3, "malformed_json": 3}
    assert files_of(tmp_path / "merged") == files_of(tmp_path / "whole")


@pytest.mark.unit
@pytest.mark.parametrize(
    "sizes,count",
    [([5] * 10, 3), ([100, 1, 1, 1, 1], 3), ([1, 1, 1, 100], 4), ([3, 1, 4, 1, 5, 9, 2, 6], 2)],
)
def test_part_bounds_are_contiguous_non_empty_and_balanced(sizes, count):
    bounds = part_bounds(sizes, count)
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == count + 1
    assert all(a < b for a, b in itertools.pairwise(bounds))
    sums = [sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)]
    # No cut can move by one file and bring a part closer to an equal share.
    share = sum(sizes) / count
    assert max(sums) <= share + max(sizes)
    assert np.isclose(sum(sums), sum(sizes))


@pytest.mark.e2e
def test_parts_and_merge_from_the_command_line(
    corpus_dir, tokenizer_dir, one_process, tmp_path, cli
):
    flags = ["--held-out", "0.2", "--shard-tokens", "3000", "--num-parts", "2"]
    for i in range(2):
        done = run_preprocess(
            cli, [corpus_dir], tokenizer_dir, tmp_path / f"p{i}", *flags, "--part", str(i)
        )
        assert done.returncode == 0, done.stderr
        assert f"(part {i} of 2)" in done.stdout
    merged = cli(
        "tools/preprocess.py", "--merge", str(tmp_path / "p0"), str(tmp_path / "p1"),
        "--output", str(tmp_path / "m"),
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    assert files_of(tmp_path / "m") == files_of(one_process)
    line = one_error_line(
        cli("tools/preprocess.py", "--merge", str(tmp_path / "p0"), "--output", str(tmp_path / "x"))
    )
    assert "missing [1]" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_the_bench_finds_every_variant_alike_and_no_copy_of_the_text(
    corpus_dir, tokenizer_dir, cli
):
    result = cli(
        "tools/bench_preprocess.py", "--input", str(corpus_dir), "--tokenizer",
        str(tokenizer_dir), "--num-proc", "1", "--parts", "2", "--held-out", "0.2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "every variant's folder identical: True" in result.stdout
    one = next(line for line in result.stdout.splitlines() if line.startswith("1 command"))
    peak_mb, output_mb = map(float, one.split()[-2:])
    assert 0 < peak_mb <= output_mb  # the output is all the disk a run uses
