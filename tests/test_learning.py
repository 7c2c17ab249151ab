"""A model that cannot learn fails here: tiny models of every sharing plan, both families,
relaxed sharing and the Universal Transformer must solve a copy task through the real
DeepSpeed engine (tools/check_learning.py), and must not when the shared blocks get no
gradient."""

from __future__ import annotations

import json

import pytest

from pretrain.check_learning import SYMBOLS, VARIANTS

pytestmark = pytest.mark.distributed

SOLVED = 0.9  # held-out accuracy; chance is 1 / SYMBOLS
UNSOLVED = 0.5


def check(cli, *args: str) -> list[dict]:
    result = cli("tools/check_learning.py", "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_every_sharing_plan_learns_the_copy_task(cli, family):
    results = check(cli, "--family", family)
    assert [r["variant"] for r in results] == list(VARIANTS)
    failed = {r["variant"]: round(r["accuracy"], 3) for r in results if r["accuracy"] < SOLVED}
    assert not failed, f"{family}: below {SOLVED} held-out accuracy: {failed}"


def test_the_check_fails_when_no_gradient_reaches_the_shared_blocks(cli):
    results = check(
        cli, "--cut-encoder-gradients", "--variant", "all", "--variant", "none", "--steps", "300"
    )
    assert len(results) == 4
    for r in results:
        assert r["accuracy"] < UNSOLVED, r
        assert r["accuracy"] > 0.5 / SYMBOLS  # it was scored, on the same task
