"""Pretraining entry point.

    deepspeed --module pretrain.train --config configs/tiny-albert.yaml [--dotted.overrides]
    torchrun --nproc_per_node 2 -m pretrain.train --config ...
    python -m pretrain.train --config ...          (one process)

A run writes into train.output_dir: checkpoints/, tensorboard/, metrics.jsonl. Starting a
run whose output_dir holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from pretrain import hardware
from pretrain.config import Config, ConfigError, load_config, to_dict
from pretrain.data.loader import PretrainDataset, loader_workers, make_loader
from pretrain.distillation import Distiller
from pretrain.engine import manifest, pipeline, runtime
from pretrain.engine.checkpointer import Checkpointer
from pretrain.errors import UserError, print_error
from pretrain.evaluate import HeldOut
from pretrain.export import native
from pretrain.lock import FolderInUseError, RunLock
from pretrain.metrics import (
    MetricsLogger,
    memory_stats,
    peak_tflops,
    start_wandb,
    throughput,
)
from pretrain.model import SharedTransformer
from pretrain.model.accounting import account
from pretrain.objectives import compute_loss, model_inputs
from pretrain.preflight import check_output_dir


class NonFiniteLossError(UserError):
    """A NaN/inf loss with train.on_nonfinite=stop, or too many skipped steps in a row."""

    collective = True  # every rank takes part in the vote that finds it


class StepMetrics:
    """Sums of one step's micro-batch metrics, kept as device tensors until read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.done = 0

    def add(self, metrics: dict[str, torch.Tensor] | None) -> None:
        if metrics is None:
            return
        self.done += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.done, 1) for k, v in self.sums.items()}


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.engine, self.logger, self.lock = cfg, None, None, None
        self.world = runtime.init_distributed()
        try:
            self._build()
        except BaseException:
            self.close()  # leave no process group behind (gloo exit crash, see runtime.teardown)
            raise

    def _build(self) -> None:
        cfg = self.cfg = self._resolve_precision(self.cfg)
        torch.manual_seed(cfg.train.seed)
        self.out = Path(cfg.train.output_dir)
        check_output_dir(self.out)
        self._hold_output_dir()
        self.ckpt_dir = self.out / "checkpoints"
        self.train_data = PretrainDataset(cfg, "train")
        self.eval_data = PretrainDataset(cfg, "valid") if cfg.train.eval_every else None
        tokenizer = self.train_data.tokenizer
        self.distiller = Distiller(cfg, tokenizer, self.world) if cfg.distill.teacher else None
        model = SharedTransformer(cfg.model)
        if cfg.train.init_from and not manifest.has_checkpoint(self.ckpt_dir):
            self._init_from(model, cfg.train.init_from)
        if self.distiller is not None:
            self.distiller.add_projection(model)
        model.encoder.checkpoint_layers = cfg.engine.activation_checkpointing
        if cfg.train.compile:
            model.encoder.compile_blocks()
        self.pipelined = cfg.engine.pipeline_stages > 1
        self.label_key = pipeline.label_key(model)
        module = pipeline.SharedPipeline(model, cfg) if self.pipelined else model
        self.engine = runtime.initialize(module, cfg, self.world)
        self.step, self.consumed, self.skipped_in_row = 0, 0, 0
        self.checkpoints = Checkpointer(self.ckpt_dir, cfg, self.world, self._print)
        at = self.checkpoints.resume(self.engine, tokenizer.info.checksum)
        if at is not None:
            self.step, self.consumed = at.step, at.consumed
            if self.step == cfg.train.max_steps:
                self._print(f"already at train.max_steps ({self.step}): nothing left to train")
        self.first_step = self.step
        accounting = account(cfg)
        self.flops_per_token = accounting.flops_per_token
        self.peak = self._peak_tflops()
        self.logger = MetricsLogger(
            self.out,
            enabled=self.world.rank == 0,
            tensorboard=cfg.logging.tensorboard,
            total_steps=cfg.train.max_steps,
            initial_step=self.step,
            wandb_run=self._start_wandb(accounting) if self.world.rank == 0 else None,
        )
        self._signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _hold_output_dir(self) -> None:
        """One run per train.output_dir: rank 0 holds its lock for the whole run, and a
        folder another live run holds stops every rank before anything in it is touched."""
        found: str | UserError | None = None
        if self.world.rank == 0:
            self.lock = RunLock(self.out)
            try:
                found = self.lock.acquire()
            except FolderInUseError as err:
                found = err
        found = runtime.broadcast_object(found)
        if isinstance(found, UserError):
            raise found
        if found:
            self._print(found)

    def _start_wandb(self, accounting) -> Any:
        """A W&B run with the resolved config and the parameter counts (logging.wandb)."""
        log = self.cfg.logging
        if not log.wandb:
            return None
        params = {
            "unique_params": accounting.unique_params,
            "effective_params": accounting.effective_params,
            "flops_per_token": accounting.flops_per_token,
        }
        config = {**to_dict(self.cfg), "params": params}
        run = start_wandb(self.out, log.wandb_project, log.wandb_run_name, log.wandb_mode, config)
        run.summary.update(params)
        return run

    def _resolve_precision(self, cfg: Config) -> Config:
        """`cfg` with engine.precision as it runs here (auto resolved), which is what the
        checkpoints record; one line says what auto chose, or why an explicit bf16 is slow."""
        choice = runtime.resolve_precision(cfg.engine.precision, self.world)
        if choice.message:
            self._print(choice.message)
        engine = dataclasses.replace(cfg.engine, precision=choice.precision)
        return dataclasses.replace(cfg, engine=engine)

    def _peak_tflops(self) -> float:
        """The MFU denominator, in the dtype the model's matmuls run in: `logging.peak_tflops`,
        else the datasheet's, else a matmul peak measured once per host (rank 0 alone)."""
        precision = self.cfg.engine.precision
        device = hardware.device_name(self.world.device)
        peak = peak_tflops(device, precision, self.cfg.logging.peak_tflops)
        if peak is None:
            measured = runtime.measured_peak(precision, self.world)
            self._print(f"MFU against the {measured.describe()}")
            peak = measured.tflops
        return peak

    def _init_from(self, model: SharedTransformer, directory: str) -> None:
        """Start from a native export's weights; its model config must be this run's."""
        theirs = native.load_config(directory)
        if theirs != self.cfg.model:
            raise ConfigError(
                f"train.init_from {directory} holds a different model config than this run's;"
                " make model.* match its config.json"
            )
        model.load_state_dict(native.load_model(directory).state_dict())
        self._print(f"initialised from {directory}")

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The engine's forward and the loss of one batch on the device, with the
        teacher's logits at the same positions (and its hidden states) when distilling."""
        inputs, distiller = model_inputs(batch), self.distiller
        if distiller is None:
            return compute_loss(self.engine(**inputs), batch, self.cfg)
        output = self.engine(**inputs, output_hidden_states=distiller.matches_hidden)
        teacher = distiller.teach(inputs)
        loss, metrics = compute_loss(output, batch, self.cfg, teacher.logits)
        if distiller.matches_hidden:
            term, more = distiller.hidden_term(output, teacher, self.engine.module, batch)
            loss = loss + term
            metrics |= more
            metrics["loss"] = loss.detach()
        return loss, metrics

    # -- state -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum  # acted on between steps, on every rank at once

    def _client_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "config": self.cfg.to_dict(),
            "tokenizer_checksum": self.train_data.tokenizer.info.checksum,
            "world_size": self.world.size,
        }

    def save(self) -> None:
        skipping = self.skipped_in_row > 0
        self.checkpoints.save(self.engine, self.step, self._client_state(), skipping)

    def _print(self, message: str) -> None:
        if self.world.rank == 0:
            print(message, file=sys.stderr, flush=True)

    # -- steps -------------------------------------------------------------------------

    def micro_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Forward and backward of one micro-batch, gradients accumulated; None when its
        loss was not finite on some rank, and then no rank backpropagates it. The metrics
        stay tensors on the device: reading them syncs the host, so only logging does."""
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        loss, metrics = self._loss(batch)
        # The one host sync of a micro-step: every rank must agree before backward.
        if runtime.any_rank(not bool(torch.isfinite(loss)), self.world.device):
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step + 1}; stopped with the last"
                    f" checkpoint intact (train.on_nonfinite=skip skips such updates)"
                )
            self._print(f"step {self.step + 1}: non-finite loss, micro-batch skipped")
            return None
        self.engine.backward(loss)
        return metrics

    def train_step(self, loader: Iterator) -> StepMetrics:
        """One optimizer step over grad_accum_steps micro-batches (none when every one was
        skipped)."""
        if self.pipelined:
            return self.pipeline_step(loader)
        step = StepMetrics()
        for _ in range(self.cfg.engine.grad_accum_steps):
            step.add(self.micro_step(next(loader)))
        if step.done:
            self.engine.step()  # the accumulation boundary: reduce, clip, update
        return step

    def _pipeline_batch(self, batch: dict[str, torch.Tensor]) -> tuple:
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        return pipeline.pipeline_batch(batch, self.label_key)

    def pipeline_step(self, loader: Iterator) -> StepMetrics:
        """One optimizer step of the pipeline engine, which runs the grad_accum_steps
        micro-batches itself (its first and last stage take them). Its loss,
        averaged over micro-batches and replicas and sent to every stage, is the step's one
        metric. The engine cannot leave a micro-batch out: a non-finite loss stops the run
        before anything is saved."""
        e = self.cfg.engine
        # Read here, on every stage (the middle ones discard theirs): the engine keeps the
        # iterator it is given, and one holding the loader would keep the loader's workers
        # alive past the run, the process then waiting on them at exit.
        micro = [self._pipeline_batch(next(loader)) for _ in range(e.grad_accum_steps)]
        loss = self.engine.train_batch(iter(micro))
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}; stopped with the last checkpoint"
                f" intact (with engine.pipeline_stages={e.pipeline_stages} no micro-batch"
                " can be skipped)"
            )
        step = StepMetrics()
        # The last stage has each micro-batch's metrics, the others the loss (all ran).
        metrics = self.engine.module.take_metrics()
        for m in metrics or [{"loss": loss.detach()}] * e.grad_accum_steps:
            step.add(m)
        return step

    def replica(self) -> tuple[int, int]:
        """This rank's data-parallel replica and the number of replicas: the loaders shard
        by replica, the stages of one pipeline reading the same micro-batches."""
        if self.pipelined:
            return self.engine.grid.data_parallel_id, self.engine.grid.data_parallel_size
        return self.world.rank, self.world.size

    def reduce(self, step: StepMetrics) -> dict[str, float]:
        """A step's metrics averaged over micro-batches and ranks (one all-reduce; every
        rank calls it on the same steps)."""
        means = self._from_last_stage(step.means())
        means["skipped_micro_batches"] = self.cfg.engine.grad_accum_steps - step.done
        return runtime.mean_across_ranks(means, self.world.device)

    def _from_last_stage(self, means: dict[str, float]) -> dict[str, float]:
        """Pipelined, each rank takes its pipeline's last stage's metrics: the stages
        before it compute none."""
        return pipeline.from_last_stage(self.engine, means) if self.pipelined else means

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over every target of the same train.eval_steps held-out batches per
        replica each time (pretrain.evaluate.HeldOut: weighted by targets, not per-batch
        means), and the targets scored over all replicas."""
        e = self.cfg.engine
        loader = iter(make_loader(self.eval_data, 0, e.micro_batch_size, *self.replica()))
        self.engine.eval()
        held_out = HeldOut()
        for _ in range(self.cfg.train.eval_steps):
            held_out.add(self._eval_metrics(next(loader)))
        self.engine.train()
        # every rank holds its replica's sums: their mean over ranks has the same ratios
        sums = runtime.mean_across_ranks(self._from_last_stage(held_out.sums), self.world.device)
        replicas = self.replica()[1]
        means = held_out.means(
            {k: v * replicas if k.endswith("_tokens") else v for k, v in sums.items()}
        )
        return {f"eval_{k}": v for k, v in means.items()}

    def _eval_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One held-out micro-batch's metrics (pipelined: the last stage's, the loss
        elsewhere)."""
        if self.pipelined:
            loss = self.engine.eval_batch(iter([self._pipeline_batch(batch)]), num_micro_batches=1)
            metrics = self.engine.module.take_metrics()
            return metrics[0] if metrics else {"loss": loss}
        _, metrics = self._loss({k: v.to(self.world.device) for k, v in batch.items()})
        return metrics

    def _step_metrics(self, metrics: dict[str, float], samples: int, seconds: float) -> dict:
        tokens = samples * self.cfg.data.seq_length
        speed = throughput(tokens, seconds, self.flops_per_token, self.world.size, self.peak)
        fp16 = self.cfg.engine.precision == "fp16"
        scale = runtime.current_loss_scale(self.engine) if fp16 else None
        return {
            **metrics,
            "tokens_seen": self.consumed * self.cfg.data.seq_length,
            "lr": self.engine.get_lr()[0],
            "grad_norm": self.engine.get_global_grad_norm(),
            "loss_scale": scale,
            **speed,
            **memory_stats(self.world.device),
        }

    # -- the run -----------------------------------------------------------------------

    def run(self) -> int:
        cfg, e = self.cfg, self.cfg.engine
        replica, replicas = self.replica()
        per_step = e.micro_batch_size * e.grad_accum_steps * replicas
        loader = iter(
            make_loader(
                self.train_data,
                self.consumed,
                e.micro_batch_size,
                replica,
                replicas,
                loader_workers(cfg.data.num_workers, self.world.device),
            )
        )
        while self.step < cfg.train.max_steps:
            if runtime.any_rank(self._signal is not None, self.world.device):
                self._print("signal received: saving a checkpoint and exiting")
                break
            start = time.perf_counter()
            metrics = self.train_step(loader)
            self.step += 1
            self.consumed += per_step
            self._count_skipped(metrics)
            self._after_step(metrics, per_step, time.perf_counter() - start)
        self.save()
        self._print(self.logger.summary())
        self._check_sound()
        return 0

    def _check_sound(self) -> None:
        """A run whose end state is not sound ends in an error, however it ended (max_steps,
        a signal): its last checkpoint is older than its last step."""
        problem = self.checkpoints.unsound()
        if problem is not None:
            raise NonFiniteLossError(problem)

    def _count_skipped(self, step: StepMetrics) -> None:
        """Steps in a row with every micro-batch skipped; too many is a diverged run."""
        self.skipped_in_row = 0 if step.done else self.skipped_in_row + 1
        if not step.done:
            self.checkpoints.count_skipped()
        if self.skipped_in_row >= self.cfg.train.max_skipped_steps:
            raise NonFiniteLossError(
                f"the last {self.skipped_in_row} steps (to step {self.step}) all had non-finite"
                f" losses: the run diverged; stopped without saving (last checkpoint:"
                f" {self.checkpoints.last_sound()});"
                " lower optim.lr, or raise train.max_skipped_steps"
            )

    def _after_step(self, step: StepMetrics, samples: int, seconds: float) -> None:
        cfg = self.cfg
        first = self.step == self.first_step + 1  # the starting loss, for comparison
        if first or self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps:
            self.logger.log(self.step, self._step_metrics(self.reduce(step), samples, seconds))
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
            self.logger.log(self.step, self.evaluate())
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
            self.save()

    def _write_comms(self) -> None:
        """Bytes each kind of collective moved in this process's run (comms logger)."""
        runtime.log_comm_summary()
        if self.world.rank == 0:
            record = {"steps": self.step - self.first_step, "bytes": runtime.comm_bytes()}
            (self.out / "comms.json").write_text(json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()
        if self.engine is not None and self.cfg.engine.comms_logger:
            self._write_comms()
        engine, self.engine = self.engine, None
        runtime.teardown(engine)


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    # Set by launch/pretrain.sh on every rank of one job, to find them on every node.
    parser.add_argument("--launch_id", default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def main(argv: list[str]) -> int:
    path, overrides = parse_args(argv)
    trainer = Trainer(load_config(path, overrides))
    try:
        code = trainer.run()
    except BaseException:
        # No teardown: with a rank gone it would wait on the others. Keep the metrics.
        if trainer.logger is not None:
            trainer.logger.close()
        raise
    trainer.close()
    return code


def rank_main(argv: list[str]) -> NoReturn:
    """One rank, ending fast when it fails. Its error goes out as one line (an error every
    rank shares, from rank 0 only), then the process leaves at once: an orderly exit would
    wait on ranks blocked in a collective (about 40 s with gloo), while leaving closes its
    connections, so every other rank stops in its next collective. Those ranks say only
    that a peer ended, and the launcher ends the job with the failing rank's status."""
    try:
        code = main(argv)
    except UserError as err:
        print_error(err)
        code = 2
    except Exception as err:
        if runtime.lost_a_peer(err):
            rank = os.environ.get("RANK", "?")
            first = str(err).strip().splitlines()[0][:160]
            print(f"rank {rank}: stopped, another rank ended ({first})", file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code and runtime.is_distributed():
        if code == 1:
            time.sleep(2)  # the launcher ends the job with the status of whichever it sees first
        os._exit(code)
    if code:
        sys.exit(code)  # a failure exits in full: the other ranks' lines come first
    leave(0)


def leave(code: int) -> NoReturn:
    """End the process once the run is closed. Threads are joined and exit handlers run as
    in a normal exit; what is skipped is the interpreter's own teardown, which frees every
    module of torch and DeepSpeed one by one: about 2 s a rank after the run's last line,
    and the launcher waits for it."""
    threading._shutdown()  # as at any exit: threading's exit hooks (executors), then joins
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    rank_main(sys.argv[1:])
