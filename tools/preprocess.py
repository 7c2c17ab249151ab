"""Tokenize raw text into memory-mapped token shards for pretraining.

    python tools/preprocess.py --input corpus/ extra.jsonl --tokenizer tok/ --output shards/
        [--num-proc N] [--text-field text] [--held-out 0.01 | --held-out 50]

Reads .txt (one document per file), .jsonl/.json, .csv, .parquet or a save_to_disk folder.
Bad rows are skipped and counted by reason in shards/metadata.json and on the console.
"""

from __future__ import annotations

import argparse
import sys
import time

from pretrain.data.preprocess import DEFAULT_SHARD_TOKENS, preprocess
from pretrain.errors import main_guard


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/preprocess.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or datasets")
    parser.add_argument("--tokenizer", required=True, help="folder from tokenizer/train.py")
    parser.add_argument("--output", required=True, help="new folder for the shards")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--text-field", default="text", help="field/column holding the text")
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.0,
        help="documents held out for evaluation: a fraction (< 1) or a count (>= 1)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out choice")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    meta = preprocess(
        args.input,
        args.tokenizer,
        args.output,
        text_field=args.text_field,
        num_proc=args.num_proc,
        held_out=args.held_out,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
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
    print(
        f"wrote {args.output} ({meta['dtype']}) in {elapsed:.1f}s, {tokens / elapsed:,.0f} tokens/s"
    )
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
