"""Ours against what users would run instead: Hugging Face's run_mlm.py recipe.

    python tools/bench_hf_recipe.py [CONFIG] [--dotted.overrides] [--steps N] [--seeds S ...]
        [--ranks R] [--json]

Both sides train the config's model (default configs/demo.yaml) for `--steps` steps on `--ranks`
CPU ranks (or every GPU) with DeepSpeed at the config's ZeRO stage and the precision
`engine.precision` chooses, at the same global batch, learning rate, Adam settings, weight
decay, warmup, clipping and mask rate:

- ours: the trainer through launch/pretrain.sh (MLM and, where the config has it, SOP);
- Hugging Face's: `Trainer` with its DeepSpeed integration training `AlbertForMaskedLM` of
  the same dimensions from its own initialisation, fed as run_mlm.py feeds it: the training
  documents (tokenized by the same SentencePiece model), each as [CLS] tokens [SEP],
  concatenated and cut into blocks of `data.seq_length`, masked on the fly by
  `DataCollatorForLanguageModeling` in the training process. Its schedule decays linearly
  to 0 (HF's `linear`), so ours runs with `optim.min_lr_ratio=0` here.

Throughput is each side's steady state: the tokens of the steps after the first tenth
over their time (ours from its logged intervals). Both trained models are then scored by
one evaluator on the held-out batches the trainer evaluates on (HeldOut over the MLM
targets, in the run's precision). One row per seed, then the mean and
half range of each column and of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.bench_train import resolve_config
from pretrain.config import Config, ConfigError, load_config
from pretrain.data.corpus import prepare_default_data
from pretrain.data.shards import TokenShards
from pretrain.engine import runtime
from pretrain.engine.optim import budget_warmup
from pretrain.errors import main_guard
from pretrain.evaluate import HeldOut, held_out_batches
from pretrain.export.hf import HFReference, albert_tokenizer, format_for_family
from pretrain.export.open import open_model
from pretrain.hardware import choose_precision
from pretrain.model import SharedTransformer
from pretrain.objectives import model_inputs
from pretrain.objectives.mlm import mlm_loss

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="demo", help="a file or a name in configs/")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (GPUs: every one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the HF side, one per rank
    return parser.parse_known_args(argv)


def run_config(args: argparse.Namespace, overrides: list[str], seed: int) -> tuple[Config, list]:
    """The config both sides train, and the overrides that make the trainer run it."""
    planned = load_config(args.config, overrides)
    warmup, note = budget_warmup(planned.optim, planned.train.max_steps, args.steps)
    if note:
        print(f"--steps {args.steps}: {note}", file=sys.stderr)
    extra = [
        f"--train.max_steps={args.steps}",
        f"--optim.warmup_steps={warmup}",
        f"--train.seed={seed}",
        "--optim.min_lr_ratio=0",
        f"--train.eval_every={args.steps}",
    ]
    cfg = load_config(args.config, [*overrides, *extra])
    if cfg.model.causal or cfg.model.family != "albert":
        raise ConfigError("the run_mlm.py recipe trains masked LMs: use an albert-family config")
    if Path(args.config).resolve() == DEMO and not Path(cfg.data.path).is_absolute():
        cfg.data.path = str(REPO / cfg.data.path)
        extra.append(f"--data.path={cfg.data.path}")
    return cfg, [*overrides, *extra]


def steady_tokens_per_s(tokens_per_step: int, times: list[float]) -> float:
    """`times[i]`: the clock when step i + 1 ended. The steps after the first tenth."""
    first = max(1, len(times) // 10)
    return tokens_per_step * (len(times) - first) / (times[-1] - times[first - 1])


# -- Hugging Face's side ----------------------------------------------------------------


def blocks(cfg: Config) -> torch.Tensor:
    """run_mlm.py's group_texts over the training documents: [CLS] doc [SEP] concatenated,
    cut into blocks of seq_length, the remainder dropped."""
    shards = TokenShards(cfg.data.path, "train")
    cls, sep = shards.special_ids["cls"], shards.special_ids["sep"]
    pieces = []
    for doc in range(shards.num_documents):
        pieces += [np.array([cls]), shards.document_tokens(doc).astype(np.int64), np.array([sep])]
    stream = np.concatenate(pieces)
    T = cfg.data.seq_length
    return torch.from_numpy(stream[: len(stream) // T * T].reshape(-1, T).copy())


def hf_worker(args: argparse.Namespace, overrides: list[str]) -> None:
    import transformers
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    runtime.skip_shm_comm_build()  # as our ranks do: its build lock can outlive a killed rank
    cfg = load_config(args.config, overrides)
    out = Path(args.worker)
    precision = json.loads((out / "precision.json").read_text())["precision"]
    transformers.set_seed(cfg.train.seed)
    fmt = format_for_family(cfg.model.family)
    hf_config = transformers.AlbertConfig(**fmt.adapter.config_to_hf(cfg.model))
    model = transformers.AlbertForMaskedLM(hf_config)
    tokenizer = albert_tokenizer(Path(cfg.data.path) / "tokenizer", cfg.data.seq_length)
    train = [{"input_ids": row} for row in blocks(cfg)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.objective.mask_prob)
    e, o = cfg.engine, cfg.optim
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": e.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
    }
    training = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=e.micro_batch_size,
        gradient_accumulation_steps=e.grad_accum_steps,
        max_steps=cfg.train.max_steps,
        learning_rate=o.lr,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        lr_scheduler_type="linear",
        max_grad_norm=o.grad_clip,
        seed=cfg.train.seed,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        deepspeed=ds,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        data_collator=collator,
        callbacks=[Clock()],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(str(out / "hf-model"))
        (out / "hf.json").write_text(json.dumps({"times": times}))


def run_hf(args, overrides: list[str], out: Path, precision: str) -> list[float]:
    (out / "precision.json").write_text(json.dumps({"precision": precision}))
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--nproc_per_node={args.ranks if not torch.cuda.is_available() else 'gpu'}"]
    command += [__file__, args.config, *overrides, "--worker", str(out)]
    run(command)
    return json.loads((out / "hf.json").read_text())["times"]


# -- ours --------------------------------------------------------------------------------


def run_ours(args, overrides: list[str], out: Path) -> tuple[float, Path]:
    """(steady tokens/s from the trainer's own metrics, the run folder)."""
    env = {"NUM_GPUS": str(args.ranks)} if not torch.cuda.is_available() else {}
    every = max(1, args.steps // 30)
    run_dir = out / "ours"
    ours = [f"--train.output_dir={run_dir}", "--checkpoint.every=0", f"--logging.every={every}"]
    run(["bash", str(REPO / "launch" / "pretrain.sh"), args.config, *overrides, *ours], env)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [row for row in map(json.loads, lines) if "tokens_per_s" in row]
    first = max(1, len(logged) // 10)
    kept = list(zip(logged[first - 1 :], logged[first:], strict=False))
    tokens = [now["tokens_seen"] - before["tokens_seen"] for before, now in kept]
    seconds = sum(n / now["tokens_per_s"] for n, (_, now) in zip(tokens, kept, strict=True))
    return sum(tokens) / seconds, run_dir


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"error: {command[0]} ... exited with {result.returncode}")


@torch.no_grad()
def held_out_loss(cfg: Config, model: torch.nn.Module, precision: str, ranks: int) -> float:
    """The trainer's held-out MLM loss, computed for any model with our call signature."""
    batches, _ = held_out_batches(cfg, cfg.train.eval_steps, cfg.engine.micro_batch_size * ranks)
    held_out = HeldOut()
    model.eval()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits_NV = model(**model_inputs(batch)).logits
        held_out.add(mlm_loss(logits_NV.float(), batch["mlm_labels"])[1])
    return held_out.means()["mlm_loss"]


def spread(values: list[float], spec: str) -> str:
    """Mean +- half range."""
    half = (max(values) - min(values)) / 2
    return f"{format(statistics.fmean(values), spec)} +- {format(half, spec)}"


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    args.config = str(resolve_config(args.config))
    if args.worker:
        hf_worker(args, overrides)
        return 0
    import transformers

    rows = []
    for seed in args.seeds:
        cfg, run_overrides = run_config(args, overrides, seed)
        prepare_default_data(cfg.data.path, cfg.model.vocab_size)
        precision = choose_precision(cfg.engine.precision, torch.device("cpu")).precision
        e = cfg.engine
        tokens_per_step = e.micro_batch_size * e.grad_accum_steps * args.ranks * cfg.data.seq_length
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            ours_tps, run_dir = run_ours(args, run_overrides, out)
            opened = open_model(run_dir, accepts=("run",), command="bench_hf_recipe")
            ours = SharedTransformer(opened.cfg)
            ours.load_state_dict(opened.state)
            ours_loss = held_out_loss(cfg, ours, precision, args.ranks)
            times = run_hf(args, run_overrides, out, precision)
            hf = transformers.AutoModelForMaskedLM.from_pretrained(out / "hf-model")
            hf_loss = held_out_loss(cfg, HFReference(hf.float()), precision, args.ranks)
        hf_tps = steady_tokens_per_s(tokens_per_step, times)
        row = {
            "seed": seed,
            "precision": precision,
            "ours_tokens_per_s": ours_tps,
            "hf_tokens_per_s": hf_tps,
            "ratio": ours_tps / hf_tps,
            "ours_held_out_loss": ours_loss,
            "hf_held_out_loss": hf_loss,
        }
        rows.append(row)
        print(
            f"seed {seed} ({precision}): ours {ours_tps:,.0f} tokens/s, HF Trainer"
            f" {hf_tps:,.0f} ({ours_tps / hf_tps:.2f}x); held-out MLM loss ours"
            f" {ours_loss:.3f}, HF {hf_loss:.3f}",
            flush=True,
        )
    print(
        f"{len(rows)} seeds, {args.steps} steps, {args.ranks} ranks: ours/HF"
        f" {spread([r['ratio'] for r in rows], '.2f')}x; tokens/s ours"
        f" {spread([r['ours_tokens_per_s'] for r in rows], ',.0f')}, HF"
        f" {spread([r['hf_tokens_per_s'] for r in rows], ',.0f')}; held-out MLM loss ours"
        f" {spread([r['ours_held_out_loss'] for r in rows], '.3f')}, HF"
        f" {spread([r['hf_held_out_loss'] for r in rows], '.3f')}"
    )
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
