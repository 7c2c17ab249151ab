"""Elastic resume: a checkpoint saved on one layout (ranks, ZeRO stage) continues on
another through DeepSpeed's universal checkpoint, at the same data position and with the
losses of a run that never changed layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import BASE, REPO, losses, run_single, train

from pretrain.config import load_config
from pretrain.engine import manifest, resume, universal
from pretrain.engine.resume import ResumeError

pytestmark = pytest.mark.distributed

STEPS, SAVED = 6, 3
TAG = manifest.tag_for(SAVED)
# Every layout takes the same 8 samples per step (micro-batches of 4): 2 ranks x 1
# micro-batch, or 1 rank x 2.
ONE_RANK = "--engine.grad_accum_steps=2"
# fp32 losses near 5.6, where one ulp is 4.8e-7 (8.5e-8 relative). After a change of rank
# count the gradient is summed in another order (one rank adds its two micro-batches in
# one buffer, two ranks all-reduce their halves), so the losses are not bit-equal: measured
# at most 1.3e-7 relative (1.5 ulp) over the 3 steps after the change, in both directions,
# the same as between straight runs on those layouts. A resharding error (one step count
# shared by both parameter groups after ZeRO-3's universal load) showed as 4e-4 to 6e-4.
RTOL = 1e-6


@pytest.fixture(scope="module")
def straight(shards_dir, tmp_path_factory) -> Path:
    """6 steps on 2 ranks at ZeRO-2, saving at step 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    overrides = [f"--train.max_steps={STEPS}", f"--checkpoint.every={SAVED}"]
    train(shards_dir, out, "--engine.zero_stage=2", *overrides)
    return out


@pytest.fixture(scope="module")
def on_one_rank(straight, shards_dir, tmp_path_factory) -> tuple[Path, str]:
    """The straight run's step-3 checkpoint continued to step 6 on 1 rank at ZeRO-3; the
    run folder and its stderr."""
    out = tmp_path_factory.mktemp("one_rank")
    shutil.copytree(straight / "checkpoints" / TAG, out / "checkpoints" / TAG)
    overrides = ["--engine.zero_stage=3", ONE_RANK, f"--train.max_steps={STEPS}"]
    result = run_single(shards_dir, out, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def assert_losses_after_the_change(run: Path, straight: Path) -> None:
    after = {step: loss for step, loss in losses(run).items() if step > SAVED}
    assert sorted(after) == list(range(SAVED + 1, STEPS + 1))
    expected = losses(straight)
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=RTOL, abs=0), step


def test_two_ranks_at_zero2_continue_on_one_rank_at_zero3(straight, on_one_rank):
    out, stderr = on_one_rank
    assert "resharding checkpoint from 2 ranks ZeRO-2 fp32 to 1 rank ZeRO-3 fp32" in stderr
    assert_losses_after_the_change(out, straight)


def test_one_rank_at_zero3_continues_on_two_ranks_at_zero2(straight, shards_dir, tmp_path):
    """Rank 1 finds no RNG state of its own in a 1-rank checkpoint and takes rank 0's."""
    out = tmp_path / "run"
    first = run_single(shards_dir, out, "--engine.zero_stage=3", ONE_RANK, "--train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(shards_dir, out, "--engine.zero_stage=2", f"--train.max_steps={STEPS}")
    assert "resharding checkpoint from 1 rank ZeRO-3 fp32 to 2 ranks ZeRO-2 fp32" in second.stderr
    assert_losses_after_the_change(out, straight)


def test_the_data_position_carries_over_exactly(straight, on_one_rank):
    out, stderr = on_one_rank
    assert f"resumed from {out / 'checkpoints' / TAG} at step 3 (24 samples)" in stderr
    # Step 4 is the loaded weights' first batch: the same samples, masked alike, give the
    # same predictions (one sample off would move an accuracy by a whole count).
    for key in ("mlm_acc", "sop_acc"):
        assert losses(out, key)[SAVED + 1] == pytest.approx(losses(straight, key)[SAVED + 1])
    final = manifest.tag_for(STEPS)
    resumed = manifest.read_run_state(out / "checkpoints", final)
    assert resumed["world_size"] == 1
    assert resumed["consumed_samples"] == STEPS * 8
    assert manifest.read_run_state(straight / "checkpoints", final)["consumed_samples"] == 48


def test_the_universal_form_is_converted_once_and_leaves_the_tag_whole(on_one_rank, tmp_path):
    run, _ = on_one_rank
    tag_dir = tmp_path / TAG
    shutil.copytree(run / "checkpoints" / TAG, tag_dir)
    form = tag_dir / manifest.UNIVERSAL
    assert manifest.manifest_problem(tag_dir) is None  # the tag's manifest leaves it out
    assert manifest.manifest_problem(form) is None  # its own manifest holds it
    assert not (run / "checkpoints" / universal._PARTIAL).exists()
    assert universal._convert_once(tag_dir) is True  # a later resume reuses it
    # One cut short (no manifest, as a killed conversion under the final name would be)
    # is converted again, never trusted.
    (form / manifest.MANIFEST).unlink()
    assert universal._convert_once(tag_dir) is False
    assert manifest.manifest_problem(form) is None


def check(before: dict, now: dict) -> None:
    """check_resumable of a 2-rank checkpoint with engine settings `before` on 1 rank with
    engine settings `now`."""
    config = REPO / "configs" / "tiny-albert.yaml"
    saved = load_config(config, BASE).to_dict()
    saved["engine"] |= before
    state = {"config": saved, "tokenizer_checksum": "t", "step": 3, "world_size": 2}
    cfg = load_config(config, [*BASE, *(f"--engine.{k}={v}" for k, v in now.items())])
    resume.check_resumable(state, cfg, "t", 1, "c")


def test_layouts_the_universal_form_cannot_reach_are_one_line_each():
    check({"zero_stage": 2}, {"zero_stage": 3, "precision": "bf16"})  # converted
    check({"zero_stage": 0}, {"zero_stage": 0})  # whole states, loaded as saved
    refused = [
        ({"zero_stage": 2}, {"zero_stage": 0}, "resume with engine.zero_stage 1-3"),
        ({"zero_stage": 0}, {"zero_stage": 2}, "resume with engine.zero_stage=0"),
        ({"zero_stage": 0, "precision": "bf16"}, {"zero_stage": 0}, "engine.precision=bf16"),
        ({"precision": "fp16"}, {"precision": "bf16"}, "fp16's dynamic loss scale"),
        ({"zero_stage": 1, "pipeline_stages": 2}, {"zero_stage": 1}, "2 pipeline stages"),
    ]
    for before, now, fix in refused:
        with pytest.raises(ResumeError, match=r"^cannot resume from c ") as err:
            check(before, now)
        assert fix in str(err.value)
