"""Data pipeline benchmark on the default corpus.

    python tools/bench_data.py [--workdir data/bench] [--num-proc 2]

Prints preprocessing throughput (tokens/s; target >= 1M on 2 cores) and loader throughput
(samples/s), side by side with the forward + backward time of a training micro-batch of
the same shape, so that the loader's share of a step is visible.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.data.corpus import copy_default_corpus
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.data.preprocess import preprocess
from pretrain.data.sources import ReadReport, iter_documents
from pretrain.data.tokenizer import info_file, train_tokenizer
from pretrain.errors import main_guard
from pretrain.model import SharedTransformer
from pretrain.objectives import compute_loss, model_inputs

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_preprocess(corpus: Path, tokenizer: Path, num_proc: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(dir=corpus.parent) as tmp:
        meta, seconds = timed(
            lambda: preprocess([str(corpus)], tokenizer, Path(tmp) / "out", num_proc=num_proc)
        )
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return tokens, seconds


def bench_loader(config: str, shards: Path, seq_length: int, micro: int, steps: int) -> dict:
    cfg = load_config(
        REPO / "configs" / config,
        {
            "data.path": str(shards),
            "data.seq_length": seq_length,
            "model.vocab_size": 8000,
            "model.max_position_embeddings": max(512, seq_length),
        },
    )
    dataset, init_s = timed(lambda: PretrainDataset(cfg))
    loader = iter(make_loader(dataset, 0, micro))
    next(loader)
    batches, load_s = timed(lambda: [next(loader) for _ in range(steps)])
    torch.manual_seed(0)
    model = SharedTransformer(cfg.model)
    loss, _ = compute_loss(model(**model_inputs(batches[0])), batches[0], cfg)
    loss.backward()

    def train():
        for batch in batches:
            loss, _ = compute_loss(model(**model_inputs(batch)), batch, cfg)
            loss.backward()

    _, train_s = timed(train)
    return {
        "init_s": init_s,
        "samples_per_s": steps * micro / load_s,
        "load_ms": 1000 * load_s / steps,
        "train_ms": 1000 * train_s / steps,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/bench_data.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", default="data/bench", help="corpus, tokenizer and shards")
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    corpus, tokenizer, shards = work / "corpus", work / "tokenizer", work / "shards"
    copy_default_corpus(corpus)
    if not info_file(tokenizer).exists():
        docs = iter_documents([corpus], "text", ReadReport())
        _, seconds = timed(lambda: train_tokenizer(docs, tokenizer, vocab_size=8000))
        print(f"tokenizer: unigram 8000 trained in {seconds:.1f}s")
    print("== preprocessing (default corpus, reading + tokenizing + writing shards)")
    for num_proc in sorted({1, args.num_proc}):
        tokens, seconds = bench_preprocess(corpus, tokenizer, num_proc)
        print(
            f"num_proc {num_proc}: {tokens:,} tokens in {seconds:.2f}s"
            f" = {tokens / seconds:,.0f} tokens/s"
        )
    if shards.exists():
        shutil.rmtree(shards)
    preprocess([str(corpus)], tokenizer, shards, num_proc=args.num_proc)
    print("== loader (1 process) vs forward + backward of the same micro-batch (1 thread)")
    print(
        f"{'samples':<22}{'T':>5}{'batch':>7}{'samples/s':>11}{'load ms':>9}"
        f"{'train ms':>10}{'share':>7}"
    )
    for config, family, seq in (
        ("tiny-albert.yaml", "MLM+SOP", 128),
        ("tiny-albert.yaml", "MLM+SOP", 512),
        ("tiny-llama.yaml", "causal", 512),
    ):
        r = bench_loader(config, shards, seq, micro=8, steps=40)
        share = r["load_ms"] / (r["load_ms"] + r["train_ms"])
        print(
            f"{family + ' ' + config:<22}{seq:>5}{8:>7}{r['samples_per_s']:>11,.0f}"
            f"{r['load_ms']:>9.2f}{r['train_ms']:>10.1f}{share:>7.1%}"
        )
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
