"""The sharing study (pretrain/study.py, tools/sweep.py): its sweep files, and the
machinery (one tiny sweep end to end, resume, the CSV, table and plot it writes), never its
numbers: a sweep is a benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from pretrain import study as sweep
from pretrain.config import ConfigError
from pretrain.sharing import SharingPlan

FIGURES = "figures.json"
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def args_for(path: Path, *extra: str):
    return sweep.parse_args(["--variants", str(path), "--data", "d", "--output", "o", *extra])


@pytest.mark.unit
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_variant_of_a_sweep_file_is_a_valid_config_at_equal_depth(path):
    runs = sweep.plan_runs(sweep.load_sweep(path), args_for(path, "--teacher", "t"))
    assert len(runs) == len(yaml.safe_load(path.read_text())["variants"]) + 1  # + distilled
    depths = {r.cfg.model.num_layers for r in runs}
    assert len(depths) == 1, f"variants differ in effective depth: {depths}"
    assert len({r.cfg.train.max_steps for r in runs}) == 1
    # Distillation aside, no two variants train the same model.
    plans = [
        (SharingPlan.from_config(r.cfg.model).description, r.cfg.model.universal.enabled)
        for r in runs
        if not r.cfg.distill.teacher
    ]
    assert len(set(plans)) == len(plans)


@pytest.mark.unit
def test_the_quick_preset_covers_the_plans_of_the_study():
    names = set(sweep.load_sweep(sweep.PRESETS["quick"]).variants)
    for name in ("none", "all", "sequence", "cycle", "cycle_rev", "attention-only", "ffn-only"):
        assert name in names
    assert any(n.startswith("relaxed") for n in names)
    assert any(n.startswith("universal") for n in names)


@pytest.mark.unit
def test_a_bad_sweep_file_or_variant_is_one_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../demo.yaml\nvariant:\n  a: {}\n")
    with pytest.raises(ConfigError, match="unknown: variant"):
        sweep.load_sweep(bad)
    typo = tmp_path / "typo.yaml"
    base = REPO / "configs" / "tiny-albert.yaml"
    typo.write_text(f"base: {base}\nvariants:\n  a: {{model.sharing.stratgy: all}}\n")
    with pytest.raises(ConfigError, match="variant 'a': unknown config key"):
        sweep.plan_runs(sweep.load_sweep(typo), args_for(typo))
    with pytest.raises(ConfigError, match="--only names no variant"):
        sweep.plan_runs(sweep.load_sweep(typo), args_for(typo, "--only", "b"))


@pytest.mark.unit
@pytest.mark.faults
def test_a_smoke_budget_below_the_warmup_scales_the_warmup_and_says_so(capsys):
    """The quick preset warms up for 300 of its 600 steps: `--steps 3` used to be refused
    (warmup_steps must not exceed max_steps); it now warms up for the same half."""
    quick = sweep.PRESETS["quick"]
    runs = sweep.plan_runs(sweep.load_sweep(quick), args_for(quick, "--steps", "3"))
    assert {(r.cfg.train.max_steps, r.cfg.optim.warmup_steps) for r in runs} == {(3, 2)}
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "--steps 3: optim.warmup_steps (300) exceeds a budget of 3 steps: the warmup is"
        " scaled with it to 2 (300 of the recipe's 600)"
    ]  # once, not once per variant
    # A budget the recipe's warmup fits keeps it as it is, silently.
    runs = sweep.plan_runs(sweep.load_sweep(quick), args_for(quick, "--steps", "400"))
    assert {(r.cfg.train.max_steps, r.cfg.optim.warmup_steps) for r in runs} == {(400, 300)}
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A sweep file of two tiny variants on the test corpus."""
    path = tmp_path_factory.mktemp("sweepfile") / "tiny.yaml"
    spec = {
        "base": str(REPO / "configs" / "tiny-albert.yaml"),
        "settings": {
            "model.vocab_size": 150,
            "data.seq_length": 48,
            "train.max_steps": 3,
            "optim.warmup_steps": 0,
            "engine.zero_stage": 1,
            "checkpoint.every": 2,
            "logging.every": 1,
        },
        "variants": {
            "none": {"model.sharing.strategy": "none"},
            "all": {"model.sharing.strategy": "all"},
        },
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(cli, spec: Path, shards: Path, out: Path, *extra: str):
    return cli(
        "tools/sweep.py",
        *("--variants", str(spec), "--data", str(shards), "--output", str(out), *extra),
    )


@pytest.mark.e2e
def test_a_sweep_trains_measures_and_writes_its_results_then_resumes(
    cli, tiny_sweep, shards_dir, tmp_path
):
    out = tmp_path / "sweep"
    result = run_sweep(cli, tiny_sweep, shards_dir, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["none", "all"]
    none, shared = rows
    assert int(none["unique_params"]) > int(shared["unique_params"])
    assert none["effective_params"] == shared["effective_params"]
    for row in rows:
        assert int(row["train_steps"]) == 3
        assert float(row["train_tokens_per_s"]) > 0
        figures = json.loads((out / "runs" / row["variant"] / "seed-1234" / FIGURES).read_text())
        assert figures["eval_loss"] == pytest.approx(float(row["eval_loss"]))
    table = (out / "results.md").read_text()
    assert "| none |" in table and "| all |" in table and "Unigram baseline" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again: nothing is retrained. A run that trained but was not measured (stopped between
    # the two) resumes from its checkpoint, trains no further step, and is measured.
    (out / "runs" / "all" / "seed-1234" / "figures.json").unlink()
    logs = {v: (out / "runs" / v / "seed-1234" / "train.log").read_text() for v in ("none", "all")}
    metrics = (out / "runs" / "all" / "seed-1234" / "metrics.jsonl").read_text()
    again = run_sweep(cli, tiny_sweep, shards_dir, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/2] none (seed 1234): finished before, not rerun" in again.stdout
    assert (out / "runs" / "none" / "seed-1234" / "train.log").read_text() == logs["none"]
    assert (out / "runs" / "all" / "seed-1234" / "train.log").read_text() != logs["all"]
    assert (out / "runs" / "all" / "seed-1234" / "metrics.jsonl").read_text() == metrics
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2

    # Other settings into the same folder: one error naming the run's folder, nothing run.
    changed = run_sweep(cli, tiny_sweep, shards_dir, out, "--steps", "4")
    assert changed.returncode == 2
    assert "holds a run of none (seed 1234) with other settings" in changed.stderr
    assert "Traceback" not in changed.stderr
