"""Reading raw corpora: plain text, JSON lines, CSV, Parquet and `save_to_disk` datasets.

Text and JSON-lines files may be compressed (.gz, .bz2, .xz, .zst: `corpus.jsonl.zst`) and
are then decompressed as they are read (JSON lines row by row, in bounded memory). An input
may be a glob pattern (`shards/*.jsonl.gz`, `data/**/*.txt`), expanded in sorted order, or
a Hugging Face dataset in the local datasets cache, `hf:NAME[:CONFIG][@SPLIT]` (split
`train` unless named), read in batches (or streamed, `streaming=True`) in bounded memory.

Every input yields documents (one string each). A plain-text file is one document; a JSON
line, CSV or Parquet row, or dataset row is one document. Rows that cannot be used are
skipped and counted by reason in a `ReadReport`, never dropped silently; a problem that
makes the whole input unusable is a `DataError` naming the file and the fix.
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import glob
import gzip
import io
import itertools
import json
import lzma
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".parquet")
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. zstandard's own stream
    reader ends quietly where a file is cut off inside a frame; this one raises."""

    CHUNK = 1 << 20

    def __init__(self, path: Path) -> None:
        import zstandard  # only where a .zst file is read

        self._zstd, self._file = zstandard, path.open("rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def _refill(self) -> bool:
        """Decompress the next chunk into the buffer; False at the end of the file."""
        while self._at == len(self._out):
            chunk = self._file.read(self.CHUNK)
            if not chunk:
                if not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends inside a frame (cut off?)")
                return False
            out = []
            while chunk:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._out, self._at = b"".join(out), 0
        return True

    def readinto(self, buffer) -> int:
        if not self._refill():
            return 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_zstd(path: Path) -> IO[bytes]:
    return io.BufferedReader(_ZstdReader(path))


COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zst": _open_zstd,
}
"""Compressions a text or JSON-lines file may have, by suffix (after its own)."""
GLOB_CHARS = "*?["
HUB = "hf:"
"""The prefix of an input naming a dataset in the local Hugging Face datasets cache."""
ROWS_PER_READ = 1024
"""Rows a table or dataset is read in at a time: memory stays bounded by a batch."""


@dataclass(frozen=True)
class HubInput:
    """`hf:NAME[:CONFIG][@SPLIT]`: a dataset the Hugging Face datasets cache holds."""

    name: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, raw: str) -> HubInput:
        rest, _, split = raw.removeprefix(HUB).partition("@")
        name, _, config = rest.partition(":")
        if not name or (_ and not config) or ("@" in raw and not split):
            raise DataError(f"input {raw!r}: expected {HUB}NAME[:CONFIG][@SPLIT]")
        return cls(name, config or None, split or "train")

    def __str__(self) -> str:
        config = f":{self.config}" if self.config else ""
        return f"{HUB}{self.name}{config}@{self.split}"


Input = Path | HubInput


def file_type(path: Path) -> tuple[str, str | None]:
    """(type suffix, compression suffix or None): `a.jsonl.gz` is (".jsonl", ".gz")."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def readable(path: Path) -> bool:
    """Whether the file at `path` is of a type read here (a table only uncompressed)."""
    kind, compression = file_type(path)
    return kind in (TEXT_SUFFIXES + JSON_SUFFIXES if compression else SUPPORTED)


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


@contextmanager
def open_input(path: Path) -> Iterator[IO[bytes]]:
    """The bytes of an input file, decompressed; a compressed file that does not decompress
    is one DataError naming it (whenever the damage is met while reading)."""
    compression = file_type(path)[1]
    if compression is None:
        with path.open("rb") as f:
            yield f
        return
    try:
        with COMPRESSIONS[compression](path) as f:
            yield f
    except _decompression_errors() as err:
        raise DataError(
            f"cannot decompress {path} as {compression}: {err}; fix or remove it"
        ) from None


class DataError(UserError):
    """Input data that cannot be used as given."""

    collective = True  # every rank reads the same data


@dataclass
class ReadReport:
    """What reading the inputs found, besides the documents themselves."""

    files: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Rows left out, by reason (malformed_json, missing_text_field, empty, ...)."""
    replaced_utf8: int = 0
    """Documents whose undecodable (non-UTF-8) bytes were replaced by U+FFFD."""
    decoded: Counter = field(default_factory=Counter)
    """Files read in an encoding other than UTF-8 (found by byte-order mark or NUL bytes)."""
    first_problem: dict[str, str] = field(default_factory=dict)
    """Where each skip reason was first seen (file:line), to point the user at it."""
    ignored_files: list[str] = field(default_factory=list)
    """Files in input folders with an unsupported suffix."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_problem.setdefault(reason, where)

    def summary(self) -> str:
        parts = [f"{self.documents} documents from {self.files} files"]
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"skipped {n} ({reason}, first at {self.first_problem[reason]})")
        if self.replaced_utf8:
            parts.append(f"{self.replaced_utf8} documents had non-UTF-8 bytes replaced")
        for encoding, n in sorted(self.decoded.items()):
            parts.append(f"{n} files decoded as {encoding}")
        if self.ignored_files:
            parts.append(f"ignored {len(self.ignored_files)} files of unsupported type")
        return "; ".join(parts)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


SUPPORTED_TEXT = (
    f"{', '.join(SUPPORTED)} files (text and JSON lines also as"
    f" {', '.join(COMPRESSIONS)}) or a save_to_disk folder"
)


def _expand_folder(path: Path, out: list[Path], report: ReadReport) -> None:
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        if readable(child):
            out.append(child)
        elif not child.name.startswith("."):
            report.ignored_files.append(str(child))


def _matches(pattern: str) -> list[Path]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DataError(f"input pattern {pattern!r} matches no files")
    return [Path(m) for m in matches]


def expand_inputs(paths: Iterable[str | Path], report: ReadReport) -> list[Input]:
    """Files and `save_to_disk` folders to read, patterns and folders expanded in sorted
    order. A file named outright must be of a type read here; one a pattern or folder
    finds that is not is left out and counted."""
    out: list[Input] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and str(raw).startswith(HUB):
            out.append(HubInput.parse(str(raw)))
            continue
        if not path.exists() and any(c in str(raw) for c in GLOB_CHARS):
            for match in _matches(str(raw)):
                if match.is_dir() and _is_saved_dataset(match):
                    out.append(match)
                elif match.is_dir():
                    _expand_folder(match, out, report)
                elif readable(match):
                    out.append(match)
                else:
                    report.ignored_files.append(str(match))
            continue
        if not path.exists():
            raise DataError(f"input {str(path)!r} does not exist")
        if path.is_file():
            if not readable(path):
                kind = "".join(s for s in file_type(path) if s) or "(none)"
                raise DataError(
                    f"input {str(path)!r} has unsupported type {kind!r}; supported:"
                    f" {SUPPORTED_TEXT}"
                )
            out.append(path)
        elif _is_saved_dataset(path):
            out.append(path)
        else:
            _expand_folder(path, out, report)
    if not out:
        raise DataError(
            f"no input files found in {', '.join(map(str, paths))}; expected {SUPPORTED_TEXT}"
        )
    return out


# Byte-order marks, longest first: UTF-32-LE's begins with UTF-16-LE's.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# A document is not text when more than this share of its characters are U+FFFD or control
# characters other than whitespace: random bytes decoded as UTF-8 come out about 60 % so
# (an image, a zip renamed .txt), while Latin-1 text, whose accented letters each become
# one U+FFFD, stays far below (27 % for "Café crème" over and over).
MAX_NON_TEXT = 0.3
_NON_TEXT = re.compile("[\ufffd\x00-\x08\x0e-\x1f\x7f]")


def _wide_encoding(data: bytes) -> str | None:
    """UTF-16/32 without a byte-order mark, told by where its NUL bytes fall (the high bytes
    of ASCII characters); None for anything else."""
    sample = data[:4096]
    if len(sample) < 8 or sample.count(0) < len(sample) // 4:
        return None

    def nul(offset: int, step: int) -> bool:
        column = sample[offset::step]
        return column.count(0) >= 0.9 * len(column)

    for encoding, step, nuls, text in (
        ("utf-32-le", 4, (1, 2, 3), 0),
        ("utf-32-be", 4, (0, 1, 2), 3),
        ("utf-16-le", 2, (1,), 0),
        ("utf-16-be", 2, (0,), 1),
    ):
        if all(nul(i, step) for i in nuls) and not nul(text, step):
            return encoding
    return None


def _decode(data: bytes, report: ReadReport) -> str:
    """Text of a file: UTF-8, or UTF-16/32 when a byte-order mark or the NUL pattern says
    so (counted); undecodable UTF-8 bytes become U+FFFD (counted)."""
    encoding = next((enc for bom, enc in BOMS if data.startswith(bom)), None)
    encoding = encoding or _wide_encoding(data)
    if encoding not in (None, "utf-8-sig"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            pass  # not that encoding after all: judged as bytes below
        else:
            report.decoded[encoding.removesuffix("-le").removesuffix("-be")] += 1
            return text
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.replaced_utf8 += 1
        return data.decode("utf-8-sig", errors="replace")


def _non_text_share(text: str) -> float:
    sample = text[:100_000]
    return len(_NON_TEXT.findall(sample)) / max(len(sample), 1)


def _check_text(value: object, where: str, report: ReadReport) -> str | None:
    """The usable text of one row, or None after counting why it is not usable."""
    if value is None:
        report.skip("null_text", where)
    elif not isinstance(value, str):
        report.skip("non_string_text", where)
    elif not value.strip():
        report.skip("empty", where)
    elif _non_text_share(value) > MAX_NON_TEXT:
        report.skip("not_text", where)
    else:
        return value
    return None


def _read_text_file(path: Path, report: ReadReport) -> Iterator[str]:
    with open_input(path) as f:
        data = f.read()
    text = _check_text(_decode(data, report), str(path), report)
    if text is not None:
        yield text


def _json_rows(path: Path, report: ReadReport) -> Iterator[tuple[str, object]]:
    """(location, parsed row) of a JSON-lines file, or of a file holding one JSON array."""
    with open_input(path) as f:  # peeked, not read: a decompressing stream cannot seek back
        if f.peek(1)[:1] == b"[":
            try:
                rows = json.loads(_decode(f.read(), report))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} is not valid JSON (line {err.lineno}): fix or remove it"
                ) from None
            yield from ((f"{path}:item {i}", row) for i, row in enumerate(rows))
            return
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, report)
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError:
                report.skip("malformed_json", f"{path}:{number}")


def _read_json(path: Path, text_field: str, report: ReadReport) -> Iterator[str]:
    objects = 0
    fields_seen: set[str] = set()
    for where, row in _json_rows(path, report):
        if not isinstance(row, dict):
            report.skip("not_an_object", where)
            continue
        objects += 1
        fields_seen.update(row)
        if text_field not in row:
            report.skip("missing_text_field", where)
            continue
        text = _check_text(row[text_field], where, report)
        if text is not None:
            yield text
    if objects and text_field not in fields_seen:
        raise _missing_field(path, text_field, fields_seen)


def _missing_field(path: Path | str, text_field: str, fields: Iterable[str]) -> DataError:
    return DataError(
        f"--text-field {text_field!r} not found in {path} (fields: {', '.join(sorted(fields))});"
        " pass --text-field NAME"
    )


def _read_dataset(path: Path, text_field: str, report: ReadReport) -> Iterator[str]:
    import datasets  # heavy import, only when a table or saved dataset is read

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(
                        f"saved dataset {path} has splits {', '.join(ds)} but no 'train' split;"
                        " pass the split's folder instead"
                    )
                ds = ds["train"]
        else:
            kind = path.suffix.lower().lstrip(".")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except (ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    finally:
        datasets.enable_progress_bars()
    yield from _rows(ds, str(path), text_field, report)


def _rows(ds: Any, where: str, text_field: str, report: ReadReport) -> Iterator[str]:
    """The texts of a (possibly streamed) dataset, a batch of rows at a time."""
    if ds.column_names is not None and text_field not in ds.column_names:
        raise _missing_field(where, text_field, ds.column_names)
    i = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=ROWS_PER_READ):
        for value in batch[text_field]:
            text = _check_text(value, f"{where}:row {i}", report)
            i += 1
            if text is not None:
                yield text


@contextmanager
def _offline() -> Iterator[None]:
    """The datasets cache alone: nothing is downloaded while reading an `hf:` input."""
    import datasets
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _read_hub(
    source: HubInput, text_field: str, streaming: bool, report: ReadReport
) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        with _offline():
            ds = datasets.load_dataset(
                source.name, source.config, split=source.split, streaming=streaming
            )
    except (ValueError, ConnectionError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"input {source}: not readable from the local datasets cache"
            f" ({datasets.config.HF_DATASETS_CACHE}): {first}; download it first where the"
            f" network is reachable: datasets.load_dataset({source.name!r}"
            f"{', ' + repr(source.config) if source.config else ''})"
        ) from None
    finally:
        datasets.enable_progress_bars()
    yield from _rows(ds, str(source), text_field, report)


@dataclass(frozen=True)
class Part:
    """Part `index` of `count`: a contiguous run of the expanded inputs, balanced by bytes,
    so that the parts read in order are the inputs in order (pretrain.data.preprocess)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise DataError(
                f"--part {self.index} of --num-parts {self.count}: give 0 <= part < num-parts"
            )

    def select(self, inputs: list[Input], report: ReadReport) -> list[Input]:
        if self.count == 1:
            return inputs
        hub = [str(i) for i in inputs if isinstance(i, HubInput)]
        if hub:
            raise DataError(
                f"input {hub[0]} is one dataset and cannot be split into --num-parts; save it"
                " as files (e.g. Dataset.to_json in pieces) or preprocess it in one part"
            )
        if len(inputs) < self.count:
            raise DataError(
                f"--num-parts {self.count} needs at least as many input files; the inputs hold"
                f" {len(inputs)}: split them (e.g. `split -n l/{self.count}`) or use fewer parts"
            )
        if self.index:  # the unreadable files of a folder are reported once, by part 0
            report.ignored_files.clear()
        bounds = part_bounds([_size(i) for i in inputs], self.count)
        return inputs[bounds[self.index] : bounds[self.index + 1]]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def part_bounds(sizes: list[int], count: int) -> list[int]:
    """Boundaries b_0 = 0 < b_1 < ... < b_count = len(sizes) cutting `sizes` into `count`
    contiguous runs of about equal sum, none empty."""
    cumulative = list(itertools.accumulate(sizes, initial=0))
    bounds = [0]
    for i in range(1, count):
        first = bisect.bisect_left(cumulative, cumulative[-1] * i / count)
        bounds.append(min(max(first, bounds[-1] + 1), len(sizes) - (count - i)))
    return [*bounds, len(sizes)]


def iter_documents(
    paths: Iterable[str | Path],
    text_field: str,
    report: ReadReport,
    streaming: bool = False,
    part: Part = Part(),
) -> Iterator[str]:
    """Documents of every input in order (of `part` of the inputs only); `report` counts what
    was skipped. `streaming`: `hf:` datasets are streamed from the cache's files rather than
    opened as tables."""
    for path in part.select(expand_inputs(paths, report), report):
        report.files += 1
        if isinstance(path, HubInput):
            docs = _read_hub(path, text_field, streaming, report)
        elif path.is_file() and file_type(path)[0] in TEXT_SUFFIXES:
            docs = _read_text_file(path, report)
        elif path.is_file() and file_type(path)[0] in JSON_SUFFIXES:
            docs = _read_json(path, text_field, report)
        else:
            docs = _read_dataset(path, text_field, report)
        for doc in docs:
            report.documents += 1
            yield doc
    not_text = report.skipped["not_text"]
    if not_text and not_text >= report.documents:
        raise DataError(
            f"most of the input is not text: {not_text} documents of binary or undecodable"
            f" bytes (first at {report.first_problem['not_text']}) against {report.documents}"
            " of text; point the input at text files (UTF-8, or UTF-16/32)"
        )
