"""SentencePiece tokenizer: training with the special symbols the objectives need, and
loading with the metadata that ties token shards and checkpoints to it.

A tokenizer folder holds `spiece.model` (the name HF's ALBERT tokenizer expects),
`spiece.vocab`, and `tokenizer_info.json` with the special ids, vocab size and the model
file's SHA-256 checksum (`tokenizer.json` in folders written before: still read).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pretrain.data.sources import DataError
from pretrain.errors import UserError

MODEL_FILE = "spiece.model"
VOCAB_FILE = "spiece.vocab"
INFO_FILE = "tokenizer_info.json"
# Its earlier name, still read: Hugging Face's fast tokenizer file has the same one.
EARLIER_INFO_FILE = "tokenizer.json"
WORD_START = "\u2581"  # SentencePiece's word-boundary mark

# Fixed ids: pad 0 matches model.pad_token_id's default; control symbols never come out of
# raw text, so a literal "[MASK]" in the corpus stays text.
SPECIAL_PIECES = {
    "pad": "[PAD]",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_MAX_SENTENCE_CHARS = 2000


def split_sentences(text: str) -> list[str]:
    """Lines, and long lines at sentence punctuation; empty pieces dropped. ALBERT's segment
    pairs are built from these units."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if len(line) <= _MAX_SENTENCE_CHARS:
            out.append(line)
        else:
            out.extend(s for s in _SENTENCE_END.split(line) if s)
    return out


def file_checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    special_ids: dict[str, int]
    checksum: str
    model_type: str
    lowercase: bool


def info_file(directory: str | Path) -> Path:
    """The metadata file of a tokenizer folder: INFO_FILE, or in folders written before it
    had that name, EARLIER_INFO_FILE when it holds our metadata rather than Hugging Face's
    tokenizer. INFO_FILE (absent) when neither is there."""
    directory = Path(directory)
    earlier = directory / EARLIER_INFO_FILE
    if not (directory / INFO_FILE).exists() and earlier.is_file():
        try:
            if "checksum" in json.loads(earlier.read_text()):
                return earlier
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            pass
    return directory / INFO_FILE


class Tokenizer:
    """A trained SentencePiece model with its special ids."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        model, info = self.directory / MODEL_FILE, info_file(self.directory)
        for needed in (model, info):
            if not needed.is_file():
                raise DataError(
                    f"tokenizer folder {str(self.directory)!r} has no {needed.name};"
                    " train one with: python tokenizer/train.py --input ... --output DIR"
                )
        data = json.loads(info.read_text())
        self.info = TokenizerInfo(**data)
        if file_checksum(model) != self.info.checksum:
            raise DataError(
                f"{model} does not match the checksum in {info}: the folder was modified;"
                " retrain the tokenizer"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(model))

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def id(self, name: str) -> int:
        return self.info.special_ids[name]

    @cached_property
    def word_start(self) -> np.ndarray:
        """bool (V,): True for pieces that begin a word (and for special symbols)."""
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        starts = np.array([p.startswith(WORD_START) for p in pieces], dtype=bool)
        starts[list(self.info.special_ids.values())] = True
        return starts

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from split_sentences(text)


def train_tokenizer(
    texts: Iterable[str],
    output: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    lowercase: bool = False,
    input_sentence_size: int = 0,
    seed: int = 1234,
) -> TokenizerInfo:
    """Train SentencePiece on the sentences of `texts` and write the tokenizer folder.

    `input_sentence_size` > 0 samples that many sentences (for large corpora).
    """
    output = Path(output)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    names = list(SPECIAL_PIECES)
    # SentencePiece turns an exception from its iterator into a RuntimeError holding a
    # traceback; a bad input found while reading ends the iterator and is raised after.
    failures: list[UserError] = []

    def sentences() -> Iterator[str]:
        try:
            yield from _sentences(texts)
        except UserError as err:
            failures.append(err)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            character_coverage=0.9995,
            pad_id=0,
            pad_piece=SPECIAL_PIECES["pad"],
            unk_id=1,
            unk_piece=SPECIAL_PIECES["unk"],
            bos_id=2,
            bos_piece=SPECIAL_PIECES["bos"],
            eos_id=3,
            eos_piece=SPECIAL_PIECES["eos"],
            control_symbols=[SPECIAL_PIECES[n] for n in ("cls", "sep", "mask")],
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        if failures:
            raise failures[0] from None
        message = str(err).splitlines()[-1]
        if "Vocabulary size is too high" in message or "vocab_size" in message:
            raise DataError(f"cannot train the tokenizer: {message}; lower --vocab-size") from None
        raise DataError(f"cannot train the tokenizer: {message}") from None
    if failures:
        raise failures[0]
    output.mkdir(parents=True, exist_ok=True)
    (output / MODEL_FILE).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    (output / VOCAB_FILE).write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    )
    info = TokenizerInfo(
        vocab_size=sp.vocab_size(),
        special_ids={n: sp.piece_to_id(SPECIAL_PIECES[n]) for n in names},
        checksum=file_checksum(output / MODEL_FILE),
        model_type=model_type,
        lowercase=lowercase,
    )
    (output / INFO_FILE).write_text(json.dumps(info.__dict__, indent=2, sort_keys=True) + "\n")
    return info
