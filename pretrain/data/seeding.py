"""Per-sample random generators for a whole micro-batch at once.

Every sample draws from its own generator, `np.random.default_rng(SeedSequence([seed,
position, ...]))`, so that a sample is the same wherever and on however many ranks a run
resumes. Building such a generator costs about 18 us (SeedSequence's hashing, then PCG64's
seeding), as much as masking the sample. Here the hashing of a batch of keys is a few numpy
passes over uint32 words, the PCG64 seeding is four 128-bit operations per key, and one
generator is set to each resulting state in turn (1.3 us): the same streams, bit for bit.

SeedSequence and PCG64 are fixed algorithms (NumPy keeps their streams stable across
releases); tests/test_seeding.py compares every state with NumPy's own.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# SeedSequence's constants (numpy/random/bit_generator.pyx).
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_POOL = 4  # words: keys of up to 4 uint32 words hash as if padded with zeros
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341  # PCG64's 128-bit multiplier
_MASK128 = (1 << 128) - 1


def _hash_constants(init: int, mult: int, n: int) -> list[tuple[np.uint32, np.uint32]]:
    """The multiplier before and after each of n hashmix calls: it advances the same way
    whatever is hashed, so the sequence is fixed."""
    pairs, const = [], init
    for _ in range(n):
        after = (const * mult) & 0xFFFFFFFF
        pairs.append((np.uint32(const), np.uint32(after)))
        const = after
    return pairs


_POOL_CONSTS = _hash_constants(_INIT_A, _MULT_A, _POOL + _POOL * (_POOL - 1))
_STATE_CONSTS = _hash_constants(_INIT_B, _MULT_B, 2 * _POOL)
_SHIFT = np.uint32(_XSHIFT)


def _hashmix(value_K: np.ndarray, consts: tuple[np.uint32, np.uint32]) -> np.ndarray:
    before, after = consts
    value_K = (value_K ^ before) * after
    return value_K ^ (value_K >> _SHIFT)


def _mix(x_K: np.ndarray, y_K: np.ndarray) -> np.ndarray:
    result_K = np.uint32(_MIX_MULT_L) * x_K - np.uint32(_MIX_MULT_R) * y_K
    return result_K ^ (result_K >> _SHIFT)


def _pools(entropy_K4: np.ndarray) -> np.ndarray:
    """uint32 (K, 4): the entropy pool SeedSequence mixes from each row of 4 words."""
    consts = iter(_POOL_CONSTS)
    pool = [_hashmix(entropy_K4[:, i], next(consts)) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], next(consts)))
    return np.stack(pool, axis=1)


def _pcg64_states(pool_K4: np.ndarray) -> list[tuple[int, int]]:
    """(state, inc) of PCG64 seeded from each pool: generate_state(4, uint64), then
    pcg_setseq_128_srandom_r(state=words 0-1, seq=words 2-3)."""
    out_K8 = np.stack(
        [_hashmix(pool_K4[:, i % _POOL], c) for i, c in enumerate(_STATE_CONSTS)], axis=1
    )
    words_K4 = out_K8.astype("<u4").view("<u8")
    states = []
    for w0, w1, w2, w3 in words_K4.tolist():
        initstate, initseq = (w0 << 64) | w1, (w2 << 64) | w3
        inc = ((initseq << 1) | 1) & _MASK128
        state = inc  # one step from state 0
        state = ((state + initstate) * _PCG_MULT + inc) & _MASK128
        states.append((state, inc))
    return states


def pcg64_states(keys_KN) -> list[tuple[int, int]]:
    """(state, inc) of `PCG64(SeedSequence(list(key)))` for every key: rows of ints >= 0
    of one length (an array (K, N) or a list of lists)."""
    if len(keys_KN) == 0:
        return []
    try:
        keys_KN = np.asarray(keys_KN, dtype=np.int64).reshape(len(keys_KN), -1)
    except OverflowError:
        return _numpy_states(keys_KN)
    if int(keys_KN.min()) < 0:
        raise ValueError("seed keys must be >= 0")
    K, N = keys_KN.shape
    if N > _POOL or int(keys_KN.max()) > 0xFFFFFFFF:
        return _numpy_states(keys_KN.tolist())
    # One uint32 word per value, zero-padded to the pool: that hashes as the key itself does.
    rows_K4 = np.zeros((K, _POOL), dtype=np.uint32)
    rows_K4[:, :N] = keys_KN
    return _pcg64_states(_pools(rows_K4))


def _numpy_states(keys) -> list[tuple[int, int]]:
    """Keys of more than 4 words: NumPy's own seeding, key by key."""
    states = []
    for key in keys:
        s = np.random.PCG64(np.random.SeedSequence([int(v) for v in key])).state["state"]
        states.append((s["state"], s["inc"]))
    return states


def generators(keys_KN: np.ndarray) -> Iterator[np.random.Generator]:
    """For each row in turn, the generator `np.random.default_rng(SeedSequence(list(row)))`.

    One generator is re-seeded for every row: use each before asking for the next."""
    bitgen = np.random.PCG64(0)
    rng = np.random.Generator(bitgen)
    for state, inc in pcg64_states(keys_KN):
        bitgen.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": inc},
            "has_uint32": 0,
            "uinteger": 0,
        }
        yield rng
