"""What more than one test file uses: tiny models and configs, the test corpus's words, and the
runners that start processes (command-line tools, the launcher and its ranks).

Fixtures live in conftest.py; test files import from here and never from one another.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from pretrain.config import ModelConfig, SharingConfig, UniversalConfig
from pretrain.model import SharedTransformer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# -- tiny models ----------------------------------------------------------------------------


def tiny_config(
    family: str = "albert", sharing: dict | None = None, universal: dict | None = None, **overrides
) -> ModelConfig:
    base = dict(
        family=family,
        vocab_size=97,
        embedding_size=16,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    base.update(overrides)
    return ModelConfig(
        **base,
        sharing=SharingConfig(**(sharing or {})),
        universal=UniversalConfig(**(universal or {})),
    )


def tiny_model(family: str = "albert", seed: int = 0, **overrides) -> SharedTransformer:
    torch.manual_seed(seed)
    return SharedTransformer(tiny_config(family, **overrides)).eval()


def random_ids(vocab: int = 97, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


# The shape every tiny Hugging Face model of the tests shares, its vocabulary that of the
# tokenizer the `tokenizer_dir` fixture trains (150 pieces).
TINY_HF = dict(
    vocab_size=150,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def tiny_hf_config(kind: str, **overrides):
    """`transformers.<kind>Config` ("Albert", "Bert", "Llama") of the TINY_HF shape."""
    import transformers

    return getattr(transformers, f"{kind}Config")(**{**TINY_HF, **overrides})


# -- the test corpus --------------------------------------------------------------------------

WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "war",
    "peace",
    "heart",
    "blood",
    "honour",
    "friend",
    "enemy",
    "castle",
    "field",
    "river",
    "storm",
    "sea",
    "ship",
    "letter",
    "ring",
    "gold",
    "silver",
    "fool",
    "speak",
    "come",
    "go",
    "stay",
    "fight",
    "fly",
    "weep",
    "laugh",
    "sleep",
    "wake",
    "send",
    "bring",
    "hold",
    "keep",
    "give",
    "take",
    "fair",
    "foul",
    "noble",
    "base",
    "bold",
    "proud",
    "sweet",
    "bitter",
    "young",
    "old",
    "true",
    "false",
    "dark",
    "bright",
]


def make_document(rng, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = rng.choice(WORDS, size=int(rng.integers(4, 14)))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


# -- processes ------------------------------------------------------------------------------


def run_process(
    command: list[str], *, env: dict | None = None, cwd: Path = REPO, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`subprocess.run` for commands that start process trees (launchers and their ranks).

    The command gets its own session; on timeout the whole group is killed and the test
    fails with the output so far. Plain `subprocess.run` kills only the direct child and then
    waits forever on pipes its grandchildren still hold open.
    """
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command[:3])} ... timed out after {timeout}s\n"
            f"{stdout[-2000:]}\n{stderr[-3000:]}"
        ) from None
    finally:
        kill_group(process)  # ranks a launcher left behind
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_ranks(script: str, *args: str, ranks: int = 2) -> list[dict]:
    """Run `tests/<script>` on `ranks` local ranks with torchrun; the JSON lines it printed.
    Programs run this way check what a test cannot reach through the trainer."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"),
        f"--master_port={free_port()}",
        str(REPO / "tests" / script),
        *args,
    ]
    result = run_process(command, env=env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of the session `process` leads, if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def run_cli(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command-line entry point of the project as a user would (`env`: variables
    set on top of this process's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return run_process([sys.executable, *args], env=env, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- training runs --------------------------------------------------------------------------

# Small and fast: a tiny all-shared ALBERT on the test corpus, constant LR so that a run
# stopped early and resumed follows the same schedule as a straight one.
BASE = [
    "--model.vocab_size=150",
    "--data.seq_length=48",
    "--engine.micro_batch_size=4",
    "--optim.lr=0.003",
    "--optim.warmup_steps=0",
    "--optim.decay=constant",
    "--logging.every=1",
    "--engine.zero3_persistence_threshold=0",
]


def env() -> dict[str, str]:
    """The environment of a launched run: one thread per rank, a free port of its own."""
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
    }


def launch_args(config: str, shards: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "bash",
        str(REPO / "launch" / "pretrain.sh"),
        str(REPO / "configs" / config),
        f"--data.path={shards}",
        f"--train.output_dir={out}",
        *BASE,
        *overrides,
    ]


def train(shards: Path, out: Path, *overrides: str, config: str = "tiny-albert.yaml"):
    """A 2-rank run through launch/pretrain.sh; returns the finished process."""
    result = run_process(launch_args(config, shards, out, *overrides), env=env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    """step -> `key` from a run's metrics.jsonl; empty before its first line is written."""
    if not (out / "metrics.jsonl").exists():
        return {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def wait_for_step(out: Path, step: int, process, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(out), default=0) >= step:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout}s")


def trainer_args(shards: Path, out: Path, *overrides: str) -> list[str]:
    """The trainer module and its arguments, for launchers other than our script."""
    return [
        "-m",
        "pretrain.train",
        "--config",
        str(REPO / "configs" / "tiny-albert.yaml"),
        f"--data.path={shards}",
        f"--train.output_dir={out}",
        *BASE,
        *overrides,
    ]


def run_single(shards: Path, out: Path, *overrides: str):
    """One process started with plain `python` (no rank variables)."""
    clean = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, *trainer_args(shards, out, *overrides)]
    return run_process(command, env=clean)


# -- system prerequisites (cluster launchers) --------------------------------------------------


def missing(reason: str) -> NoReturn:
    """A prerequisite is missing: fail under CI (CI set, as .ci/run does), else skip.

    A CI that cannot run a test must say so, not pass."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def apt_install(packages: list[str], commands: list[str]) -> None:
    """Install Debian `packages` unless every one of `commands` is already on PATH."""
    if all(shutil.which(c) for c in commands):
        return
    if os.geteuid() != 0:
        missing(f"{', '.join(commands)} missing, and installing {' '.join(packages)} needs root")
    command = ["apt-get", "install", "-y", "-q", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            missing(f"apt-get could not install {' '.join(packages)}: {result.stderr[-500:]}")


def stop_daemon(pid: int) -> None:
    """SIGTERM a daemon and wait for it to exit (SIGKILL after 15 s), so nothing outlives
    the tests."""
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(30):
            os.kill(pid, 0)
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
