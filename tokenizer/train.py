"""Train a SentencePiece tokenizer with the special symbols pretraining needs.

    python tokenizer/train.py --input corpus/ more.jsonl --vocab-size 8000 --output tok/
        [--model-type unigram|bpe] [--lowercase] [--input-sentence-size N] [--text-field text]

Inputs are .txt/.jsonl/.json/.csv/.parquet files, folders of them, or a `save_to_disk`
dataset folder. Writes spiece.model, spiece.vocab and tokenizer.json (special ids and the
model's checksum) into --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.data.sources import DataError, ReadReport, iter_documents
from pretrain.data.tokenizer import INFO_FILE, train_tokenizer
from pretrain.errors import main_guard


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tokenizer/train.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or datasets")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="folder to write the tokenizer into")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    parser.add_argument("--lowercase", action="store_true", help="case-fold while normalising")
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train on a random sample of this many sentences (0: all)",
    )
    parser.add_argument("--text-field", default="text", help="field/column holding the text")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if (output / INFO_FILE).exists():
        raise DataError(
            f"{output} already holds a tokenizer; choose another --output or delete it first"
        )
    report = ReadReport()
    info = train_tokenizer(
        iter_documents(args.input, args.text_field, report),
        output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        lowercase=args.lowercase,
        input_sentence_size=args.input_sentence_size,
        seed=args.seed,
    )
    print(f"read {report.summary()}")
    print(f"wrote {output}: {args.model_type}, vocab {info.vocab_size}, ids {info.special_ids}")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
