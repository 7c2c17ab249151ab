"""launch/pretrain.sh with a hostfile: the deepspeed launcher starts one rank on each of two
"nodes" through pdsh and ssh.

Both nodes, localhost and 127.0.0.1, are this machine. A private sshd (its own port, host key
and authorized key, all in a temporary folder) stands in for the nodes' ssh servers, and an
`ssh` first on PATH adds a client config that reaches it, as a cluster user's ~/.ssh/config
would: pdsh and the launcher's own ssh check both run `ssh` from PATH. Debian's pdsh and
openssh-server are installed when missing; sshd and whatever it started are stopped by pid
at the end. Where that cannot be done the test is skipped with the reason, or fails with it
where CI is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    BASE,
    REPO,
    apt_install,
    env,
    free_port,
    losses,
    missing,
    run_process,
    stop_daemon,
    wait_for_step,
)

from pretrain.engine import manifest

pytestmark = pytest.mark.cluster

NODES = ("localhost", "127.0.0.1")
# A 2-rank run on one node, as tests/test_e2e.py checks it: its config, overrides and losses.
GOLDEN = json.loads((REPO / "tests" / "golden" / "tiny-albert.json").read_text())
# As there: fp32, one thread per rank; another machine's kernels may move the last bits.
TOLERANCE = 1e-5


def _keys(root: Path) -> None:
    for name in ("host_key", "client_key"):
        command = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)]
        subprocess.run(command, check=True)


def _sshd_config(root: Path, port: int) -> Path:
    # StrictModes off: the keys sit under /tmp, which is world-writable.
    config = root / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
AuthorizedKeysFile {root}/client_key.pub
PidFile {root}/sshd.pid
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""
    )
    return config


def _ssh_on_path(root: Path, port: int) -> Path:
    """A folder whose `ssh` reaches the private sshd as either node, with no prompt."""
    host_key = (root / "host_key.pub").read_text().strip()
    (root / "known_hosts").write_text(f"[localhost]:{port},[127.0.0.1]:{port} {host_key}\n")
    (root / "ssh_config").write_text(
        f"""Host {" ".join(NODES)}
  Port {port}
  IdentityFile {root}/client_key
  IdentitiesOnly yes
  UserKnownHostsFile {root}/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
"""
    )
    bin_dir = root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def _start_sshd(root: Path, config: Path) -> int:
    # sshd running as root refuses to start without its privilege separation folder, which
    # the service would create at boot.
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    result = subprocess.run(
        ["/usr/sbin/sshd", "-f", str(config), "-E", str(root / "sshd.log")],
        capture_output=True,
        text=True,
    )
    # sshd returns once it has forked; the daemon writes its pid file when it listens.
    pid_file, deadline = root / "sshd.pid", time.monotonic() + 30
    while result.returncode == 0 and time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text().strip():
            return int(pid_file.read_text())
        time.sleep(0.1)
    log = (root / "sshd.log").read_text() if (root / "sshd.log").exists() else ""
    missing(f"sshd did not start: {(result.stderr + log)[-500:]}")


def _stop_sshd(pid: int) -> None:
    """Ranks of a failed run live on under sshd's sessions, out of the launcher's process
    group: end them first."""
    try:
        sessions = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in sessions:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    stop_daemon(pid)


@pytest.fixture(scope="module")
def ssh_path(tmp_path_factory):
    """PATH on which `ssh NODE` logs in to this machine without a password."""
    apt_install(["pdsh", "openssh-server", "openssh-client"], ["pdsh", "/usr/sbin/sshd", "ssh"])
    root = tmp_path_factory.mktemp("ssh")
    port = free_port()
    _keys(root)
    bin_dir = _ssh_on_path(root, port)
    pid = _start_sshd(root, _sshd_config(root, port))
    try:
        path = f"{bin_dir}:{os.environ['PATH']}"
        check = subprocess.run(
            ["ssh", NODES[1], "true"], env={**os.environ, "PATH": path}, capture_output=True
        )
        if check.returncode != 0:
            missing(f"ssh to the private sshd failed: {(root / 'sshd.log').read_text()[-500:]}")
        yield path
    finally:
        _stop_sshd(pid)


def _hostfile_run(ssh_path: str, work: Path, shards: Path, out: Path, *args: str):
    """launch/pretrain.sh through a hostfile, started in `work` as a user would."""
    (work / "hostfile").write_text("".join(f"{node} slots=1\n" for node in NODES))
    # The launcher forwards only some variables (NCCL_*, PYTHON*, ...) to the nodes; the rest
    # go in .deepspeed_env. One OpenMP thread per rank, as on one node.
    (work / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    run_env = {
        **env(),
        "PATH": ssh_path,
        "HOSTFILE": str(work / "hostfile"),
        "MASTER_ADDR": NODES[0],
    }
    paths = [f"--data.path={shards}", f"--train.output_dir={out}"]
    command = ["bash", str(REPO / "launch" / "pretrain.sh"), *args, *paths]
    return run_process(command, env=run_env, cwd=work)


def test_hostfile_run_over_pdsh_equals_a_one_node_run(ssh_path, shards_dir, tmp_path):
    assert GOLDEN["ranks"] == len(NODES)
    out = tmp_path / "run"
    config = str(REPO / GOLDEN["config"])
    result = _hostfile_run(ssh_path, tmp_path, shards_dir, out, config, *GOLDEN["overrides"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # pdsh prefixes each line with the node that wrote it: each node's rank ended well.
    lines = (result.stdout + result.stderr).splitlines()
    for node in NODES:
        ended = [x for x in lines if x.startswith(f"{node}: ") and "exits successfully" in x]
        assert len(ended) == 1, (node, lines[-40:])
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / tag / "run_state.json").read_text())
    assert state["world_size"] == len(NODES), state

    want = {int(step): loss for step, loss in GOLDEN["loss"].items()}
    got = losses(out)
    assert sorted(got) == sorted(want)
    off = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > TOLERANCE}
    assert not off, f"(now, one node) per step: {off}"


@pytest.mark.faults
def test_sigterm_to_a_hostfile_launch_reaches_every_nodes_ranks(
    ssh_path, shards_dir, tmp_path, spawn
):
    """The ranks run under each node's sshd, not under the script: SIGTERM to the script
    still reaches every one of them through pdsh; they save and exit, and the script
    returns after them with their status."""
    out = tmp_path / "run"
    (tmp_path / "hostfile").write_text("".join(f"{node} slots=1\n" for node in NODES))
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    run_env = {**env(), "PATH": ssh_path, "HOSTFILE": str(tmp_path / "hostfile")}
    run_env["MASTER_ADDR"] = NODES[0]
    config = str(REPO / "configs" / "tiny-albert.yaml")
    paths = [f"--data.path={shards_dir}", f"--train.output_dir={out}"]
    command = ["bash", str(REPO / "launch" / "pretrain.sh"), config, *BASE, *paths]
    process = spawn(
        [*command, "--train.max_steps=100000"],
        env=run_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(out, 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    lines = output.splitlines()
    for node in NODES:  # each node's rank saw the signal and ended well
        ended = [x for x in lines if x.startswith(f"{node}: ") and "exits successfully" in x]
        assert len(ended) == 1, (node, lines[-40:])
    assert "signal received: saving a checkpoint" in output
    assert not [p for p in psutil.process_iter(["cmdline"]) if _is_rank_of(p, out)]
    tag, skipped = manifest.newest_valid(out / "checkpoints")
    assert tag is not None and skipped == [] and int(tag.removeprefix("step")) >= 3


def _is_rank_of(process: psutil.Process, out: Path) -> bool:
    cmdline = process.info["cmdline"] or []
    return "pretrain.train" in cmdline and f"--train.output_dir={out}" in cmdline
