"""The installed `pretrain` command: every verb reaches its module, a wrong one is one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_process

from pretrain.__main__ import VERBS

COMMAND = Path(sys.executable).parent / "pretrain"  # the console script of this install


def pretrain(*args: str):
    return run_process([str(COMMAND), *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)


@pytest.mark.e2e
def test_the_installed_command_runs_a_verb_of_another_module():
    result = pretrain("summary", "configs/demo.yaml", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unique_params"] > 0


@pytest.mark.e2e
def test_a_mistyped_verb_is_one_line_naming_the_closest():
    result = pretrain("sumary", "configs/demo.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown verb 'sumary' (did you mean 'summary'?)" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_answers_help(verb):
    result = pretrain(verb, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
