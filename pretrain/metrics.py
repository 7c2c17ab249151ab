"""Training metrics: throughput and MFU, memory, and a logger to JSONL, TensorBoard and the console.

Nothing here knows about distribution: the trainer reduces numbers across ranks first and
builds the logger with `enabled=False` on every rank but 0.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.errors import UserError

# Dense (no 2:4 sparsity) peak TFLOP/s of one device, from the vendor datasheets. bf16/fp16 are
# tensor-core figures with fp32 accumulation (what training uses); fp32 is the non-tensor-core
# rate, since TF32 is off unless asked for. A missing precision means the device has no fast
# path for it (V100 has no bf16), so MFU is not reported rather than guessed.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},  # SXM and PCIe alike
    # AWS publishes no A10G datasheet; these are NVIDIA's A10 figures.
    "A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "L40": {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2
    "V100-PCIE": {"fp16": 112.0, "fp32": 14.0},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
}
PRECISIONS = ("bf16", "fp16", "fp32")
_GIB = 2**30


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of one device, for MFU.

    Args:
        device_name: As reported by the driver, e.g. "NVIDIA H100 80GB HBM3".
        precision: "bf16", "fp16" or "fp32".
        override: `logging.peak_tflops`; wins over the table when set.

    Returns:
        The peak, or None when the device (or its precision) is unknown, e.g. a CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if override is not None:
        return override
    name = device_name.lower()
    # Longest match first, so "H100 PCIe" beats "H100" and "L40S" beats "L4".
    matches = [key for key in PEAK_TFLOPS if key.lower() in name]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(precision)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(
    tokens: int, seconds: float, flops_per_token: float, world_size: int, peak: float | None
) -> dict[str, float | None]:
    """Throughput of an interval in which all ranks together processed `tokens` tokens.

    Returns:
        `tokens_per_s` (all ranks), `tflops` (achieved per device) and `mfu` (a fraction of
        `peak`, or None without one).
    """
    if seconds <= 0:
        raise ValueError(f"seconds ({seconds}) must be > 0")
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / peak if peak else None}


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: allocator peaks on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return {
            "mem_alloc_gib": torch.cuda.max_memory_allocated(device) / _GIB,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB,
        }
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    return {"mem_rss_gib": max_rss / (_GIB if sys.platform == "darwin" else 2**20)}


def _plain(value: Any) -> float | int | None:
    """A JSON- and TensorBoard-friendly number from a Python, numpy or 0-d tensor scalar."""
    return value.item() if hasattr(value, "item") else value


def _tb_tag(key: str) -> str:
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


# What the console shows, in order, when present.
_CONSOLE = (
    ("loss", "loss {:.3f}"),
    ("eval_loss", "eval_loss {:.3f}"),
    ("lr", "lr {:.2e}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("mfu", "mfu {:.1%}"),
)


def _console_parts(metrics: Mapping[str, Any]) -> list[str]:
    return [fmt.format(metrics[key]) for key, fmt in _CONSOLE if metrics.get(key) is not None]


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def check_wandb() -> None:
    """logging.wandb needs the wandb package: one line naming the fix, before any rank."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(
            "logging.wandb is true but the wandb package is not installed: pip install wandb"
            " (or pip install -e '.[wandb]'), or set logging.wandb=false"
        )


def start_wandb(
    output_dir: Path, project: str, name: str, mode: str, config: dict[str, Any]
) -> Any:
    """A W&B run writing under `output_dir`/wandb. Its id is kept in the run directory, so
    that a resumed run continues the same W&B run."""
    check_wandb()
    import wandb

    id_file = output_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(
        project=project,
        name=name or output_dir.resolve().name,
        dir=str(output_dir),
        id=run_id,
        resume="allow",
        mode=mode or None,
        config=config,
    )
    id_file.write_text(run.id + "\n")
    return run


class MetricsLogger:
    """Writes each logged step to `metrics.jsonl`, TensorBoard and the console.

    Args:
        output_dir: Run directory; gets `metrics.jsonl` and `tensorboard/`.
        enabled: False on ranks other than 0: every method is a no-op and nothing is created.
        tensorboard: Also write TensorBoard event files.
        total_steps: Length of the progress bar / the "/N" of console lines.
        initial_step: Where a resumed run starts its progress bar.
        wandb_run: A W&B run (`start_wandb`) that gets every logged step too, or None.
        clock: Seconds, for the elapsed time and the ETA.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool = True,
        total_steps: int | None = None,
        initial_step: int = 0,
        wandb_run: Any = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.history: list[dict[str, Any]] = []
        self._clock = clock
        self._start = clock()
        self._wandb = wandb_run
        # The ETA's rate counts only this process's steps (a resumed run starts later).
        self._rate_from: tuple[int, float] | None = None
        self._last_eval: tuple[int, float] | None = None
        self._jsonl = self._writer = self._bar = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # Append, so that a resumed run continues the same file.
        self._jsonl = (output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            # Imported here so that ranks > 0 and runs without TensorBoard never pay for it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=initial_step, file=sys.stderr)

    def log(self, step: int, metrics: Mapping[str, float | int | None]) -> None:
        """Record `metrics` of `step`: one JSONL line, TensorBoard scalars, console progress."""
        if not self.enabled:
            return
        values = {key: _plain(value) for key, value in metrics.items()}
        self.history.append({"step": step, **values})
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()  # a crash must not lose the lines already logged
        if self._writer is not None:
            for key, value in values.items():
                if value is not None:
                    self._writer.add_scalar(_tb_tag(key), value, step)
            self._writer.flush()
        if self._wandb is not None:
            shown = {_tb_tag(k): v for k, v in values.items() if v is not None}
            self._wandb.log(shown, step=step)
        self._progress(step, values)

    def _timing(self, step: int) -> list[str]:
        """Elapsed time, and the ETA to total_steps at this process's pace so far."""
        now = self._clock()
        if self._rate_from is None:
            self._rate_from = (step, now)
        parts = [f"{_hms(now - self._start)} elapsed"]
        first_step, first_time = self._rate_from
        if self.total_steps and step > first_step:
            per_step = (now - first_time) / (step - first_step)
            parts.append(f"eta {_hms(per_step * max(self.total_steps - step, 0))}")
        return parts

    def _progress(self, step: int, values: Mapping[str, Any]) -> None:
        parts = _console_parts(values)
        if values.get("eval_loss") is not None:
            self._last_eval = (step, values["eval_loss"])
        elif "loss" in values:  # a step line: how far, and the last held-out loss
            if values.get("tokens_seen") is not None:
                parts.append(f"{_count(values['tokens_seen'])} tokens")
            if self._last_eval is not None:
                parts.append("last eval_loss {1:.3f} (step {0})".format(*self._last_eval))
            parts += self._timing(step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(" | ".join(parts))
            return
        total = f"/{self.total_steps}" if self.total_steps else ""
        print(" | ".join([f"step {step}{total}", *parts]), file=sys.stderr, flush=True)

    def summary(self) -> str:
        """An aligned plain-text table of the run so far ("" when disabled)."""
        if not self.enabled:
            return ""
        rows = [("steps logged", str(len(self.history)))]
        losses = self._series("loss")
        if losses:
            rows += [
                ("first loss", f"{losses[0]:.4f}"),
                ("last loss", f"{losses[-1]:.4f}{self._stale_loss()}"),
                ("min loss", f"{min(losses):.4f}"),
            ]
        for key, label, fmt in (
            ("tokens_per_s", "mean tokens/s", "{:,.0f}"),
            ("tflops", "mean TFLOP/s", "{:.1f}"),
            ("mfu", "mean MFU", "{:.1%}"),
        ):
            if series := self._series(key):
                rows.append((label, fmt.format(sum(series) / len(series))))
        for key in ("mlm_acc", "sop_acc", "clm_acc"):
            if series := self._series(key):
                rows.append((f"final {key}", f"{series[-1]:.4f}"))
        mem_keys = sorted({key for row in self.history for key in row if key.startswith("mem_")})
        rows += [(f"peak {key}", f"{max(self._series(key)):.2f}") for key in mem_keys]
        rows.append(("wall time", _hms(self._clock() - self._start)))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)

    def _stale_loss(self) -> str:
        """Where the last logged training step had no finite loss: the step the last loss
        is from."""
        trained = [row for row in self.history if "skipped_micro_batches" in row]
        with_loss = [row["step"] for row in trained if row.get("loss") is not None]
        if not with_loss or trained[-1]["step"] == with_loss[-1]:
            return ""
        return f" (step {with_loss[-1]}; no finite loss after it, to step {trained[-1]['step']})"

    def _series(self, key: str) -> list[float]:
        return [row[key] for row in self.history if row.get(key) is not None]

    def close(self) -> None:
        """Flush and close the files and the progress bar; safe to call twice."""
        for handle in (self._jsonl, self._writer, self._bar):
            if handle is not None:
                handle.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._writer = self._bar = self._wandb = None


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
