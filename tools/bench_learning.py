"""Learning A/B: our model against Hugging Face ALBERT on the same batches.

    python tools/bench_learning.py [CONFIG] [--dotted.overrides] [--steps N] [--every K]
        [--ranks R] [--precision auto|bf16|fp32] [--no-reference] [--json]

Trains our albert-family model and Hugging Face `AlbertForPreTraining` (or
`AlbertForMaskedLM` without an SOP head) of the same dimensions, starting from the same
weights (ours, converted by the exporter), on the same batches, with the same optimizer,
schedule, clipping and loss code, interleaved step by step in one process. Every `--every`
steps both are scored on the same held-out batches, next to the unigram baseline (a model
that knows only training token frequencies). Prints both learning curves and a verdict:
ours must reach the reference's held-out loss at least as early.

The global batch is the config's micro batch x grad_accum_steps x `--ranks` (2 by default,
as `make demo` runs), so the curves line up with the real run's. Default config:
configs/demo.yaml (its corpus is prepared first when missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config, ConfigError, load_config
from pretrain.data.baseline import held_out_baseline
from pretrain.data.corpus import prepare_default_data
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.engine.optim import budget_warmup, build_optimizer, build_scheduler
from pretrain.errors import main_guard
from pretrain.evaluate import HeldOut, held_out_batches
from pretrain.export.hf import HFReference, hf_model
from pretrain.hardware import choose_precision
from pretrain.model import SharedTransformer
from pretrain.objectives import compute_loss, mlm_loss, model_inputs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(DEMO), help="YAML config")
    parser.add_argument("--steps", type=int, help="optimizer steps (default train.max_steps)")
    parser.add_argument("--every", type=int, help="evaluate every K steps (default steps/10)")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks emulated")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), help="default: the config's"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-reference", action="store_true", help="train only our model")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return parser.parse_known_args(argv)


class Learner:
    """One model with its own optimizer, schedule and running train loss."""

    def __init__(self, name: str, model: torch.nn.Module, cfg: Config, steps: int, autocast):
        self.name, self.model, self.cfg, self.autocast = name, model.train(), cfg, autocast
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps)
        self.losses: list[float] = []
        self.seconds = 0.0
        self.curve: list[dict] = []

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        with self.autocast():
            loss, metrics = compute_loss(self.model(**model_inputs(batch)), batch, self.cfg)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - start
        self.losses.append(float(metrics["mlm_loss"]))

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Held-out MLM loss and accuracy over every target of `batches`."""
        self.model.eval()
        held_out = HeldOut()
        for batch in batches:
            with self.autocast():
                logits_NV = self.model(**model_inputs(batch)).logits
            held_out.add(mlm_loss(logits_NV, batch["mlm_labels"])[1])
        self.model.train()
        means = held_out.means()
        return means["mlm_loss"], means["mlm_acc"]


def build(cfg: Config, reference: bool) -> list[torch.nn.Module]:
    torch.manual_seed(cfg.train.seed)
    ours = SharedTransformer(cfg.model)
    if not reference:
        return [ours]
    hf = hf_model({k: v.clone() for k, v in ours.state_dict().items()}, cfg.model)
    return [ours, HFReference(hf)]


def train(cfg: Config, args: argparse.Namespace) -> dict:
    steps = args.steps or cfg.train.max_steps
    cfg.optim.warmup_steps, note = budget_warmup(cfg.optim, cfg.train.max_steps, steps)
    if note:
        print(f"--steps {steps}: {note}", file=sys.stderr)
    every = args.every or max(steps // 10, 1)
    e = cfg.engine
    batch = e.micro_batch_size * e.grad_accum_steps * args.ranks
    # the same train.eval_steps held-out batches the trainer evaluates on
    eval_batches, _ = held_out_batches(cfg, cfg.train.eval_steps, e.micro_batch_size * args.ranks)
    baseline = held_out_baseline(cfg, cfg.train.eval_steps * e.micro_batch_size * args.ranks)
    choice = choose_precision(args.precision or cfg.engine.precision, torch.device("cpu"))
    if choice.message:
        print(choice.message, file=sys.stderr)
    bf16 = choice.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    names = ["ours", "reference"]
    learners = [
        Learner(name, m, cfg, steps, autocast)
        for name, m in zip(names, build(cfg, not args.no_reference), strict=False)
    ]
    loader: Iterator = iter(make_loader(PretrainDataset(cfg, "train"), 0, batch))
    print(
        f"unigram baseline on {baseline.targets} held-out targets: loss {baseline.loss:.4f},"
        f" accuracy {baseline.accuracy:.4f} (most frequent token)",
        flush=True,
    )
    header = "step " + "".join(f"| {n:>9} train  eval   acc  " for n in names[: len(learners)])
    print(header, flush=True)
    for step in range(1, steps + 1):
        b = next(loader)
        for learner in learners:
            learner.step(b)
        if step % every == 0 or step == steps:
            row = f"{step:>4} "
            for learner in learners:
                loss, acc = learner.evaluate(eval_batches)
                train_loss = float(np.mean(learner.losses[-every:]))
                learner.curve.append(
                    {
                        "step": step,
                        "train_mlm_loss": train_loss,
                        "eval_mlm_loss": loss,
                        "eval_mlm_acc": acc,
                    }
                )
                row += f"| {train_loss:>15.4f} {loss:6.4f} {acc:6.4f} "
            print(row, flush=True)
    return {
        "config": args.config,
        "steps": steps,
        "batch": batch,
        "precision": "bf16" if bf16 else "fp32",
        "baseline": dataclasses.asdict(baseline),
        **{
            learner.name: {"curve": learner.curve, "seconds": learner.seconds}
            for learner in learners
        },
    }


def first_step_below(curve: list[dict], loss: float) -> int | None:
    return next((p["step"] for p in curve if p["eval_mlm_loss"] <= loss), None)


def verdict(result: dict) -> str:
    """Does ours reach the reference's final held-out loss no later than the reference?"""
    ours, ref = result["ours"]["curve"], result["reference"]["curve"]
    target = ref[-1]["eval_mlm_loss"]
    ours_at, ref_at = first_step_below(ours, target + 1e-3), first_step_below(ref, target)
    faster = ours_at is not None and ours_at <= ref_at
    return (
        f"{'PASS' if faster else 'FAIL'}: the reference reaches held-out loss {target:.4f} at"
        f" step {ref_at}, ours {'at step ' + str(ours_at) if ours_at else 'never'}"
        f" (final: ours {ours[-1]['eval_mlm_loss']:.4f} / {ours[-1]['eval_mlm_acc']:.4f},"
        f" reference {ref[-1]['eval_mlm_loss']:.4f} / {ref[-1]['eval_mlm_acc']:.4f});"
        f" time: ours {result['ours']['seconds']:.0f} s, reference"
        f" {result['reference']['seconds']:.0f} s"
    )


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.model.causal:
        raise ConfigError("the learning A/B compares masked-LM models: use an albert-family config")
    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.config).resolve() == DEMO and not Path(cfg.data.path).is_absolute():
        cfg.data.path = str(REPO / cfg.data.path)
        prepare_default_data(cfg.data.path, cfg.model.vocab_size)
    result = train(cfg, args)
    if not args.no_reference:
        print(verdict(result), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
