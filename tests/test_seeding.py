"""Batched per-sample generators: the states NumPy's own SeedSequence + PCG64 give."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.seeding import generators, pcg64_states

pytestmark = pytest.mark.unit


def numpy_state(key: list[int]) -> tuple[int, int]:
    state = np.random.PCG64(np.random.SeedSequence(key)).state["state"]
    return state["state"], state["inc"]


def random_keys(rng: np.random.Generator, n: int, width: int, high: int) -> list[list[int]]:
    return [[int(v) for v in rng.integers(0, high, size=width)] for _ in range(n)]


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_states_equal_numpys_for_one_word_values(width):
    rng = np.random.default_rng(width)
    keys = random_keys(rng, 300, width, 2**32)
    keys[:3] = [[0] * width, [2**32 - 1] * width, [1] + [0] * (width - 1)]
    assert pcg64_states(keys) == [numpy_state(k) for k in keys]


@pytest.mark.parametrize(
    "keys",
    [
        [[0, 2**32], [3, 5]],  # a position of two words: five words in all
        [[2**40, 2**50, 1], [7, 8, 9]],
        [[1, 2, 3, 4, 5], [0, 0, 0, 0, 0]],  # more values than the pool
        [[3, 2**70], [1, 1]],  # beyond int64
    ],
)
def test_states_equal_numpys_for_long_keys(keys):
    assert pcg64_states(keys) == [numpy_state(k) for k in keys]


def test_generators_draw_what_default_rng_draws():
    keys = np.array([[7, p, 1] for p in range(1000, 1040)])
    for key, rng in zip(keys, generators(keys), strict=True):
        expected = np.random.default_rng(np.random.SeedSequence(key.tolist()))
        assert np.array_equal(rng.random(5), expected.random(5))
        assert np.array_equal(rng.permutation(30), expected.permutation(30))
        assert np.array_equal(rng.integers(0, 97, size=4), expected.integers(0, 97, size=4))


def test_negative_keys_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        pcg64_states([[0, -1]])


def test_no_keys_no_states():
    assert pcg64_states(np.zeros((0, 2), dtype=np.int64)) == []
