"""One run per output folder (pretrain/lock.py): the lock, its holder's file, a stale one
taken over, a SLURM requeue waiting for its predecessor, and two real launches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, env, launch_args, run_process, wait_for_step

from pretrain.lock import LOCK_FILE, FolderInUseError, RunLock

HOLD = """
import sys, time
from pathlib import Path
from pretrain.lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "release":
    lock.release()
"""


def holder(folder: Path, seconds: float, end: str = "release", job: str | None = None):
    """Another process holding `folder`'s lock for `seconds`, then releasing it or (end
    "crash") leaving without a word; returns once it holds it."""
    environment = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    if job:
        environment["SLURM_JOB_ID"] = job
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds), end],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.unit
def test_a_held_folder_refuses_a_second_holder_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(tmp_path)
    assert first.acquire() is None
    recorded = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (recorded["host"], recorded["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(FolderInUseError) as err:
        RunLock(tmp_path).acquire()
    assert str(err.value).startswith(f"train.output_dir {tmp_path} is in use by another run")
    assert f"pid {os.getpid()}," in str(err.value)
    assert err.value.collective
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(tmp_path)
    assert second.acquire() is None  # released: the next run takes it
    second.release()


@pytest.mark.unit
def test_another_hosts_fresh_lock_file_stops_a_run_and_a_stale_one_is_taken_over(tmp_path):
    """Where advisory locks do not reach other hosts (a shared file system), the file
    itself: refreshed lately, it stops the run; not refreshed, it is taken over with a
    warning."""
    path = tmp_path / LOCK_FILE
    other = {"host": "node-7", "pid": 4242, "job": "99", "started": "2026-12-01T10:00:00Z"}
    path.write_text(json.dumps(other) + "\n")
    with pytest.raises(FolderInUseError, match=r"\(host node-7, pid 4242, SLURM job 99, started"):
        RunLock(tmp_path, stale_s=60).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, stale_s=60)
    warning = lock.acquire()
    assert warning.startswith(f"warning: taking over {path}: its holder (host node-7, pid 4242")
    assert "has not refreshed it for 6" in warning
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.e2e
def test_a_crashed_holder_never_blocks_the_next_run(tmp_path):
    holder(tmp_path, 0, end="crash").wait()
    assert (tmp_path / LOCK_FILE).exists()  # its file stays, naming a dead process
    lock = RunLock(tmp_path)
    assert lock.acquire() is None  # the kernel released it: taken without a word
    lock.release()


@pytest.mark.e2e
def test_a_requeued_job_waits_for_its_predecessor_and_no_other_job_does(tmp_path, monkeypatch):
    predecessor = holder(tmp_path, 3, job="1234")
    monkeypatch.setenv("SLURM_JOB_ID", "5678")
    with pytest.raises(FolderInUseError, match="SLURM job 1234"):
        RunLock(tmp_path, wait_s=30).acquire()  # another job: at once
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    with pytest.raises(FolderInUseError, match=r"\(waited 1 s for it\)"):
        RunLock(tmp_path, wait_s=1).acquire()  # bounded
    start = time.monotonic()
    lock = RunLock(tmp_path, wait_s=30)
    assert lock.acquire() is None
    assert time.monotonic() - start > 0.5  # it waited for the predecessor to release
    assert predecessor.wait(timeout=10) == 0
    lock.release()


@pytest.mark.distributed
@pytest.mark.faults
def test_a_second_launch_into_a_running_folder_stops_before_touching_it(
    shards_dir, tmp_path, spawn
):
    """Two real launches into one train.output_dir: the second stops with one line naming
    the first's rank 0 and writes nothing; the first goes on, and ends as usual."""
    out = tmp_path / "run"
    args = launch_args("tiny-albert.yaml", shards_dir, out, "--train.max_steps=100000")
    first = spawn(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, first)
    held = json.loads((out / LOCK_FILE).read_text())
    logged = (out / "metrics.jsonl").read_text()
    second = run_process(args, env=env(), timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert errors[0].startswith(
        f"error: train.output_dir {out} is in use by another run"
        f" (host {held['host']}, pid {held['pid']}, started {held['started']})"
    )
    assert "resumed from" not in second.stderr  # it stopped before reading a checkpoint
    # The first run's metrics grew by its own steps only: every step once, in order.
    assert (out / "metrics.jsonl").read_text().startswith(logged)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    assert not (out / LOCK_FILE).exists()  # released at its end
