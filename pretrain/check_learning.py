"""Can the stack learn? Tiny models must solve a copy task through the real engine.

    python tools/check_learning.py [--family albert|llama] [--variant NAME ...] [--steps N]
        [--cut-encoder-gradients] [--json]

Each sequence is a random string x of `HALF` symbols followed by itself. albert models
predict masked positions of the second copy (bidirectional); llama models predict every
next token of the second copy (causal). Both answers are fully determined by the first
copy, and only attention from one position to another `HALF` away can find them: a model
at chance scores 1/`SYMBOLS`, a model whose attention learned nothing cannot exceed it by
much, and a working stack reaches near-perfect accuracy in a few hundred CPU steps.

Every variant (each sharing strategy and scope, relaxed sharing, Universal Transformer
with ACT, both families) trains through `pretrain.engine.runtime` (a DeepSpeed engine of
one rank, ZeRO-2, our optimizer and schedule) and is scored on held-out strings.
`--cut-encoder-gradients` zeroes every gradient reaching the shared blocks, the failure
this check exists to catch; accuracy must then stay low.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pretrain.config import Config, load_config
from pretrain.data.masking import IGNORE_INDEX
from pretrain.engine import runtime
from pretrain.errors import main_guard
from pretrain.evaluate import HeldOut
from pretrain.families import FAMILIES
from pretrain.model import SharedTransformer
from pretrain.objectives import compute_loss, model_inputs

SPECIALS = 7  # ids 0..6 are [PAD] <unk> <s> </s> [CLS] [SEP] [MASK], as in our tokenizers
MASK_ID = 6
SYMBOLS = 24
HALF = 4
MASKED = 3  # positions of the second copy an albert sample predicts

BASE = {
    "model.vocab_size": SPECIALS + SYMBOLS,
    "model.embedding_size": 32,
    "model.hidden_size": 64,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.intermediate_size": 128,
    "model.max_position_embeddings": 2 * HALF,
    "data.seq_length": 2 * HALF,
    "optim.lr": 2e-3,
    "optim.warmup_steps": 20,
    "optim.decay": "constant",
    "engine.zero_stage": 2,
    "engine.precision": "fp32",  # the thresholds hold in fp32, on every machine alike
    "engine.micro_batch_size": 32,
    "train.seed": 0,
}
VARIANTS: dict[str, dict] = {
    "none": {"model.sharing.strategy": "none"},
    "all": {"model.sharing.strategy": "all"},
    "sequence": {"model.sharing.strategy": "sequence", "model.sharing.num_sets": 2},
    "cycle": {"model.sharing.strategy": "cycle", "model.sharing.num_sets": 2},
    "cycle_rev": {"model.sharing.strategy": "cycle_rev", "model.sharing.num_sets": 2},
    "all-attention": {"model.sharing.strategy": "all", "model.sharing.scope": "attention"},
    "all-ffn": {"model.sharing.strategy": "all", "model.sharing.scope": "ffn"},
    "range": {"model.sharing.strategy": "all", "model.sharing.start": 1, "model.sharing.end": 2},
    "relaxed": {
        "model.sharing.strategy": "all",
        "model.sharing.ratio": 0.5,
        "model.sharing.tie_penalty": 1e-4,
    },
    "universal": {"model.sharing.strategy": "all", "model.universal.enabled": True},
}


def copy_batch(family: str, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of the copy task in the loader's format for `family`."""
    x_BS = torch.randint(SPECIALS, SPECIALS + SYMBOLS, (batch, HALF), generator=generator)
    ids_BT = torch.cat([x_BS, x_BS], dim=1)
    out = {"attention_mask": torch.ones_like(ids_BT)}
    if FAMILIES[family].causal:
        labels_BT = torch.full_like(ids_BT, IGNORE_INDEX)
        # Position t predicts token t + 1: from HALF - 1 on, that token is a copy.
        labels_BT[:, HALF - 1 : -1] = ids_BT[:, HALF:]
        return out | {"input_ids": ids_BT, "labels": labels_BT}
    scores_BS = torch.rand(batch, HALF, generator=generator)
    chosen_BS = scores_BS.argsort(dim=1)[:, :MASKED]
    where_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
    where_BT[:, HALF:] = torch.zeros(batch, HALF, dtype=torch.bool).scatter(1, chosen_BS, True)
    labels_BT = torch.where(where_BT, ids_BT, IGNORE_INDEX)
    masked_BT = torch.where(where_BT, MASK_ID, ids_BT)
    return out | {
        "input_ids": masked_BT,
        "mlm_labels": labels_BT,
        "token_type_ids": torch.zeros_like(ids_BT),
    }


def variant_config(family: str, variant: str, steps: int) -> Config:
    overrides = {**BASE, "model.family": family, "train.max_steps": steps, **VARIANTS[variant]}
    return load_config(None, overrides)


def cut_encoder_gradients(model: SharedTransformer) -> None:
    for p in model.encoder.parameters():
        p.register_hook(torch.zeros_like)


def accuracy(engine, family: str, batches: list[dict[str, torch.Tensor]], cfg: Config) -> float:
    key = f"{FAMILIES[family].objective}_acc"
    engine.eval()
    held_out = HeldOut()
    with torch.no_grad():
        for batch in batches:
            held_out.add(compute_loss(engine(**model_inputs(batch)), batch, cfg)[1])
    engine.train()
    return held_out.means()[key]


def run_variant(family: str, variant: str, steps: int, cut: bool, world) -> dict:
    cfg = variant_config(family, variant, steps)
    torch.manual_seed(cfg.train.seed)
    model = SharedTransformer(cfg.model)
    if cut:
        cut_encoder_gradients(model)
    engine = runtime.initialize(model, cfg, world)
    train_gen, eval_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    held_out = [copy_batch(family, 64, eval_gen) for _ in range(4)]
    start, batch = time.perf_counter(), cfg.engine.micro_batch_size
    try:
        for _ in range(steps):
            b = copy_batch(family, batch, train_gen)
            loss, _ = compute_loss(engine(**model_inputs(b)), b, cfg)
            engine.backward(loss)
            engine.step()
        acc = accuracy(engine, family, held_out, cfg)
    finally:
        engine.destroy()
    return {
        "family": family,
        "variant": variant,
        "steps": steps,
        "accuracy": acc,
        "final_loss": float(loss.detach()),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family", choices=list(FAMILIES), action="append", help="default: every family"
    )
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="default: all")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cut-encoder-gradients", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    world = runtime.init_distributed()
    try:
        for family in args.family or FAMILIES:
            for variant in args.variant or VARIANTS:
                result = run_variant(family, variant, args.steps, args.cut_encoder_gradients, world)
                if args.json:
                    print(json.dumps(result), flush=True)
                else:
                    print(
                        f"{family:>6} {variant:<14} accuracy {result['accuracy']:.3f}"
                        f" (chance {1 / SYMBOLS:.3f}), loss {result['final_loss']:.3f},"
                        f" {result['seconds']:.1f} s",
                        flush=True,
                    )
    finally:
        runtime.teardown(None)
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
