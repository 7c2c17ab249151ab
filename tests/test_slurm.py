"""launch/pretrain.sbatch on a real single-node SLURM cluster started by the test.

The cluster is private to the test: its own slurm.conf (SLURM_CONF), munge socket, ports
and state under a temporary folder; Debian's slurm-wlm and munge are installed when
missing; the daemons are stopped by pid at the end. Without root the daemons cannot run:
the tests are skipped with that reason, or fail with it where CI is set (a CI that cannot
run them must say so, not pass).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BASE, REPO, apt_install, free_port, losses, missing, stop_daemon

pytestmark = pytest.mark.cluster


def _write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=pretrain-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ReturnToService=2
KillWait=30
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        missing("SLURM daemons (slurmctld, slurmd, munged) need root here")
    apt_install(["slurm-wlm", "munge"], ["slurmctld", "munged"])
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(_write_conf(root))}
    munged = [
        "munged",
        "--force",
        f"--key-file={key}",
        f"--socket={root}/munge.socket",
        f"--pid-file={root}/munged.pid",
        f"--log-file={root}/munged.log",
        f"--seed-file={root}/munged.seed",
    ]
    subprocess.run(munged, check=True)
    subprocess.run(["slurmctld"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    try:
        deadline = time.time() + 60
        while (
            "idle"
            not in subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
            ).stdout
        ):
            assert time.time() < deadline, (root / "slurmd.log").read_text()[-2000:]
            time.sleep(1)
        yield env
    finally:
        # Jobs a failed test left behind would outlive slurmd in their slurmstepd.
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        time.sleep(2)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = root / f"{name}.pid"
            if pid_file.exists():
                stop_daemon(int(pid_file.read_text().strip()))


def submit(env, workdir: Path, shards: Path, out: Path, *overrides: str) -> str:
    command = [
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        f"--chdir={workdir}",
        f"--output={workdir}/slurm-%j.out",
        str(REPO / "launch" / "pretrain.sbatch"),
        str(REPO / "configs" / "tiny-albert.yaml"),
        f"--data.path={shards}",
        f"--train.output_dir={out}",
        "--data.num_workers=0",
        *BASE,
        *overrides,
    ]
    env = {**env, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def job_state(env, job: str) -> dict[str, str]:
    text = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def finished(env, job: str) -> bool:
    return job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-job")
    job = submit(cluster, work, shards_dir, work / "run", "--train.max_steps=60")
    wait_for(lambda: finished(cluster, job), 300, f"job {job}")
    return job, work


def test_batch_job_trains_with_two_tasks(cluster, uninterrupted):
    job, work = uninterrupted
    state = job_state(cluster, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", state
    assert sorted(losses(work / "run")) == list(range(1, 61))
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step00000060"
    logs = work / "slurm-logs" / job / "restart-0"
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "2 tasks on" in (work / f"slurm-{job}.out").read_text()


def test_requeue_checkpoints_and_resumes_with_the_same_losses(
    cluster, uninterrupted, shards_dir, tmp_path
):
    out = tmp_path / "run"
    job = submit(cluster, tmp_path, shards_dir, out, "--train.max_steps=60")
    wait_for(lambda: len(losses(out)) >= 3, 300, "step 3")
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
    wait_for(lambda: job_state(cluster, job).get("JobState") == "PENDING", 120, "the requeue")
    # SLURM holds a requeued job for a while (BeginTime); release it now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    wait_for(lambda: finished(cluster, job), 300, f"job {job} after the requeue")
    assert job_state(cluster, job)["JobState"] == "COMPLETED"
    first = (tmp_path / "slurm-logs" / job / "restart-0" / "rank-0.log").read_text()
    second = (tmp_path / "slurm-logs" / job / "restart-1" / "rank-0.log").read_text()
    assert "signal received: saving a checkpoint" in first
    assert "resumed from" in second
    expected = losses(uninterrupted[1] / "run")
    assert losses(out).keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(losses(out)[step] - loss) <= 1e-6, step


def test_dead_rank_ends_the_job(cluster, shards_dir, tmp_path):
    import psutil

    out = tmp_path / "run"
    job = submit(
        cluster, tmp_path, shards_dir, out, "--train.max_steps=100000", "--checkpoint.every=2"
    )
    wait_for(lambda: len(losses(out)) >= 5, 300, "step 5")
    ranks = [
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if "pretrain.train" in (p.info["cmdline"] or [])
        and (p.info["environ"] or {}).get("SLURM_PROCID") == "1"
        and (p.info["environ"] or {}).get("SLURM_JOB_ID") == job
    ]
    assert ranks, "rank 1 not found"
    start = time.time()
    ranks[0].kill()
    wait_for(lambda: finished(cluster, job), 90, "the job to end")
    assert time.time() - start < 60
    assert job_state(cluster, job)["JobState"] == "FAILED"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / "run_state.json").is_file()


def test_a_bad_config_fails_the_job_with_one_line_in_its_output(cluster, shards_dir, tmp_path):
    job = submit(cluster, tmp_path, shards_dir, tmp_path / "run", "--engine.zero_stage=5")
    wait_for(lambda: finished(cluster, job), 120, f"job {job}")
    state = job_state(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", state
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert "error: engine.zero_stage: 5 is not one of 0 | 1 | 2 | 3" in output
    assert "Traceback" not in output
    assert not (tmp_path / "slurm-logs" / job).exists()  # no task was started


def test_preprocess_array_job_writes_the_parts_and_merges_them(
    cluster, corpus_dir, tokenizer_dir, tmp_path
):
    from test_data import files_of

    from pretrain.data.preprocess import preprocess

    flags = ["--held-out", "0.2", "--shard-tokens", "3000"]
    out = tmp_path / "data"
    command = [
        "sbatch", "--parsable", "--array=0-2", f"--chdir={tmp_path}",
        f"--output={tmp_path}/slurm-%A_%a.out", str(REPO / "launch" / "preprocess.sbatch"),
        str(out), "--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), *flags,
    ]  # fmt: skip
    env = {**cluster, "PYTHON": str(Path(os.sys.executable))}
    job = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    job = job.stdout.strip()

    def queued() -> bool:
        listed = subprocess.run(["squeue", "-h", "-j", job], env=cluster, capture_output=True)
        return bool(listed.stdout.strip())

    wait_for(lambda: not queued(), 300, f"array job {job}")
    outputs = [(tmp_path / f"slurm-{job}_{i}.out").read_text() for i in range(3)]
    assert all(f"part {i} of 3" in text for i, text in enumerate(outputs)), outputs
    assert sum("merging into" in text for text in outputs) == 1, outputs
    assert sorted(p.name for p in (tmp_path / "data.parts").iterdir()) == [
        "part-00000", "part-00001", "part-00002",
    ]  # fmt: skip
    preprocess([str(corpus_dir)], tokenizer_dir, tmp_path / "one", held_out=0.2, shard_tokens=3000)
    assert files_of(out) == files_of(tmp_path / "one")
