"""Metrics: device peaks, throughput/MFU arithmetic, memory, and the JSONL/TensorBoard logger."""

from __future__ import annotations

import ast
import json
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain import metrics
from pretrain.errors import UserError
from pretrain.metrics import (
    PEAK_TFLOPS,
    PRECISIONS,
    MetricsLogger,
    memory_stats,
    peak_tflops,
)
from pretrain.metrics import throughput as compute_throughput

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("nvidia h100 pcie", 756.0),  # case-insensitive
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.05),  # not the "L4" inside it
        ("NVIDIA L4", 121.0),
        ("AMD Instinct MI300X", 1307.4),
    ],
)
def test_peak_tflops_bf16_by_device(device_name, expected):
    assert peak_tflops(device_name, "bf16", None) == expected


def test_peak_tflops_fp32_differs_from_bf16():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32", None) == 67.0
    assert peak_tflops("NVIDIA H100 PCIe", "fp32", None) == 51.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", None) == 19.5


def test_peak_tflops_override_wins():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", 500.0) == 500.0
    assert peak_tflops("cpu", "fp32", 1.5) == 1.5


@pytest.mark.parametrize("device_name", ["cpu", "Intel Xeon Platinum 8480+", ""])
def test_peak_tflops_unknown_device_is_none(device_name):
    assert peak_tflops(device_name, "bf16", None) is None


def test_peak_tflops_v100_has_no_bf16():
    assert peak_tflops("Tesla V100-SXM2-32GB", "fp16", None) == 125.0
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16", None) is None


def test_peak_tflops_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision 'tf32'"):
        peak_tflops("NVIDIA H100 PCIe", "tf32", None)


def test_peak_table_is_dense_and_consistent():
    for name, peaks in PEAK_TFLOPS.items():
        assert set(peaks) <= set(PRECISIONS), name
        # Tensor cores give fp16 at least twice plain fp32; no dense figure tops 1,500
        # TFLOP/s (MI300X's 2:4-sparse 2,615 would).
        assert 2 * peaks["fp32"] <= peaks["fp16"] < 1500, name


def test_throughput_by_hand():
    # 2 ranks processed 32,768 tokens in 2 s: 16,384 tok/s, 8,192 per device,
    # at 6 GFLOP/token = 49.152 TFLOP/s per device; out of 989 that is 4.97%.
    out = compute_throughput(32_768, 2.0, 6e9, world_size=2, peak=989.0)
    assert out["tokens_per_s"] == pytest.approx(16_384.0)
    assert out["tflops"] == pytest.approx(49.152)
    assert out["mfu"] == pytest.approx(49.152 / 989.0)


def test_throughput_without_peak_has_no_mfu():
    out = compute_throughput(1000, 0.5, 1e9, world_size=1, peak=None)
    assert out["tokens_per_s"] == pytest.approx(2000.0)
    assert out["tflops"] == pytest.approx(2.0)  # 2,000 tok/s * 1 GFLOP
    assert out["mfu"] is None


def test_throughput_rejects_empty_interval():
    with pytest.raises(ValueError, match="seconds"):
        compute_throughput(1000, 0.0, 1e9, world_size=1, peak=None)


def read_jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logger_writes_jsonl_lines(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=100)
    logger.log(10, {"loss": torch.tensor(6.5), "lr": np.float32(1e-3), "mfu": None})
    # The line is on disk before close: a crash must not lose it.
    assert read_jsonl(tmp_path) == [
        {"step": 10, "loss": 6.5, "lr": pytest.approx(1e-3), "mfu": None}
    ]
    logger.log(20, {"loss": 6.25, "tokens": 4096})
    logger.close()
    lines = read_jsonl(tmp_path)
    assert [line["step"] for line in lines] == [10, 20]
    assert type(lines[0]["loss"]) is float
    assert lines[1] == {"step": 20, "loss": 6.25, "tokens": 4096}


def test_logger_appends_on_resume(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=30)
    first.log(10, {"loss": 7.0})
    first.log(20, {"loss": 6.0})
    first.close()
    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False, initial_step=20)
    resumed.log(30, {"loss": 5.0})
    resumed.close()
    assert [(line["step"], line["loss"]) for line in read_jsonl(tmp_path)] == [
        (10, 7.0),
        (20, 6.0),
        (30, 5.0),
    ]


def test_logger_writes_tensorboard_scalars(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log(10, {"loss": 6.5, "lr": 1e-3, "mfu": None})
    logger.log(20, {"loss": 6.0, "lr": 2e-3, "eval_loss": 6.2})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/loss"}

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("train/loss") == [(10, 6.5), (20, 6.0)]
    assert scalars("train/lr") == [(10, pytest.approx(1e-3)), (20, pytest.approx(2e-3))]
    assert scalars("eval/loss") == [(20, pytest.approx(6.2))]


def test_disabled_logger_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False, total_steps=100)
    logger.log(10, {"loss": 6.5})
    assert logger.summary() == ""
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr().err == ""


def test_plain_progress_lines_when_not_a_tty(tmp_path, capsys):
    """Each step line: the metrics, tokens seen, the last held-out loss, elapsed time and
    the ETA at this process's pace (none before a second step gives one)."""
    clock = iter([0.0, 10.0, 20.0]).__next__
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=100, clock=clock)
    metrics = {"lr": 1e-3, "tokens_per_s": 12345.4, "mfu": 0.4123, "tokens_seen": 1_310_720}
    logger.log(20, {"loss": 6.1234, **metrics})
    logger.log(20, {"eval_loss": 5.98765})
    logger.log(40, {"loss": 5.5, "lr": 9e-4, "mfu": None, "tokens_seen": 2_621_440})
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "step 20/100 | loss 6.123 | lr 1.00e-03 | 12,345 tok/s | mfu 41.2% | 1.3M tokens"
        " | 0:00:10 elapsed",
        "step 20/100 | eval_loss 5.988",
        "step 40/100 | loss 5.500 | lr 9.00e-04 | 2.6M tokens | last eval_loss 5.988 (step 20)"
        " | 0:00:20 elapsed | eta 0:00:30",
    ]


def test_progress_bar_on_a_tty(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=100)
    logger.log(20, {"loss": 6.1234, "lr": 1e-3})
    assert logger._bar.n == 20
    logger.close()
    err = capsys.readouterr().err
    assert "loss 6.123" in err
    assert "step 20/100 |" not in err  # a bar, not plain lines


def test_summary_reports_run(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step, loss, tok_s, acc in [(10, 7.25, 1000.0, 0.1), (20, 5.125, 3000.0, 0.3)]:
        logger.log(step, {"loss": loss, "tokens_per_s": tok_s, "mlm_acc": acc, "mem_rss_gib": 1.5})
    logger.log(30, {"eval_loss": 5.0})
    text = logger.summary()
    logger.close()
    rows = dict(line.rsplit("  ", 1) for line in text.splitlines())
    rows = {label.strip(): value for label, value in rows.items()}
    assert rows["steps logged"] == "3"
    assert rows["first loss"] == "7.2500"
    assert rows["last loss"] == "5.1250"
    assert rows["min loss"] == "5.1250"
    assert rows["mean tokens/s"] == "2,000"
    assert rows["final mlm_acc"] == "0.3000"
    assert rows["peak mem_rss_gib"] == "1.50"
    assert "wall time" in rows
    assert "mean MFU" not in rows  # never logged, never invented


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"mem_rss_gib"}
    assert 0 < stats["mem_rss_gib"] < 1024


def test_metrics_module_knows_nothing_of_distribution():
    tree = ast.parse((REPO / "pretrain" / "metrics.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {m for m in imported if m.startswith(("deepspeed", "torch.distributed"))}


@pytest.mark.unit
def test_wandb_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="wandb package is not installed: pip install wandb"):
        metrics.check_wandb()
