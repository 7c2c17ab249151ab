"""Fixtures shared by the tests, and the tiers every test belongs to (one of TIERS).

Helpers that are not fixtures are in helpers.py.
"""

import os
import subprocess

import pytest
from helpers import kill_group, make_document, run_cli

# Tests build everything they use; nothing may reach the Hub, here or in the processes they start.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# Each test is marked with exactly one (pyproject.toml describes them); `make test-fast` runs
# the unit tier.
TIERS = ("unit", "distributed", "parity", "e2e", "cluster")
# A unit test runs in the test process: these fixtures start others.
PROCESS_FIXTURES = {"cli", "spawn"}


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="write the golden files under tests/golden from this run instead of comparing",
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    problems = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if not tiers:
            problems.append(f"{item.nodeid}: no tier marker")
        elif len(tiers) > 1:
            problems.append(f"{item.nodeid}: more than one tier marker ({', '.join(tiers)})")
        elif tiers == ["unit"] and PROCESS_FIXTURES & set(item.fixturenames):
            used = ", ".join(sorted(PROCESS_FIXTURES & set(item.fixturenames)))
            problems.append(f"{item.nodeid}: marked unit but starts processes ({used})")
    if problems:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker of {', '.join(TIERS)}:\n  "
            + "\n  ".join(problems)
        )


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture
def spawn():
    """Popen in a session of its own, the whole group killed at teardown whatever happened."""
    started = []

    def start(command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)
        process.wait(timeout=30)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small corpus: 24 plain-text documents of 20-60 sentences."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (root / f"doc{i:02d}.txt").write_text(make_document(rng, int(rng.integers(20, 60))))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    from pretrain.data.sources import ReadReport, iter_documents
    from pretrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_documents([corpus_dir], "text", ReadReport()), out, vocab_size=150)
    return out


@pytest.fixture(scope="session")
def shards_dir(corpus_dir, tokenizer_dir, tmp_path_factory):
    from pretrain.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "data"
    preprocess([str(corpus_dir)], tokenizer_dir, out, held_out=3)
    return out
