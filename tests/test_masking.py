"""Dynamic ALBERT masking: rates, the 80/10/10 split, n-gram spans, whole words, seeding.

Statistical checks allow 5 binomial standard deviations (a false alarm about once in
3.5 million runs); every sample is seeded, so a failure reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pretrain.data.masking import (
    IGNORE_INDEX,
    MaskedSample,
    MaskingSpec,
    mask_batch,
    mask_tokens,
    masking_rng,
)
from pretrain.data.seeding import generators

pytestmark = pytest.mark.unit

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = frozenset({PAD, UNK, CLS, SEP, MASK})
VOCAB = 1000
SIGMAS = 5


def make_spec(**overrides) -> MaskingSpec:
    base = dict(
        mask_prob=0.15,
        max_predictions=10_000,
        max_ngram=3,
        whole_word=True,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIALS,
    )
    return MaskingSpec(**{**base, **overrides})


def make_sequence(
    rng: np.random.Generator, length: int, n_real: int, vocab: int = VOCAB, unk_rate: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] a [SEP] b [SEP] [PAD]... with words of 1-4 pieces.

    Segment b may begin mid-word (word_start False after [SEP]), and with unk_rate some
    pieces become <unk>, so continuation pieces also follow special tokens inside the text.
    """
    normal_N = np.setdiff1d(np.arange(vocab), sorted(SPECIALS))
    text_N = rng.choice(normal_N, size=n_real)
    text_N[rng.random(n_real) < unk_rate] = UNK
    ends_N = np.cumsum(rng.integers(1, 5, size=n_real))
    starts_N = np.zeros(n_real, dtype=bool)
    starts_N[[0, *ends_N[ends_N < n_real]]] = True
    cut = int(rng.integers(1, n_real))
    starts_N[cut] = rng.random() < 0.5
    tokens_T = np.full(length, PAD, dtype=np.int64)
    tokens_T[: n_real + 3] = [CLS, *text_N[:cut], SEP, *text_N[cut:], SEP]
    word_start_T = np.ones(length, dtype=bool)
    word_start_T[1 : cut + 1] = starts_N[:cut]
    word_start_T[cut + 2 : n_real + 2] = starts_N[cut:]
    return tokens_T, word_start_T


def sample_many(
    spec: MaskingSpec, n: int, length: int, min_real: int, vocab: int = VOCAB, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, MaskedSample]]:
    """n masked sequences of `length` tokens with between min_real and length - 3 real ones."""
    rng = np.random.default_rng(seed)
    out = []
    for position in range(n):
        n_real = int(rng.integers(min_real, length - 2))
        tokens_T, word_start_T = make_sequence(rng, length, n_real, vocab, unk_rate=0.02)
        sample = mask_tokens(tokens_T, word_start_T, spec, masking_rng(seed, position))
        out.append((tokens_T, word_start_T, sample))
    return out


def reference_words(tokens_T: np.ndarray, word_start_T: np.ndarray) -> list[list[int]]:
    """The token indexes of every word, written as plainly as the rule reads."""
    words: list[list[int]] = []
    prev_real = False
    for i, token in enumerate(tokens_T.tolist()):
        if token in SPECIALS:
            prev_real = False
            continue
        if prev_real and not word_start_T[i]:
            words[-1].append(i)
        else:
            words.append([i])
        prev_real = True
    return words


def n_real_of(tokens_T: np.ndarray) -> int:
    return int((~np.isin(tokens_T, sorted(SPECIALS))).sum())


def within(count: int, total: int, p: float) -> bool:
    """count / total equals p within SIGMAS binomial standard deviations."""
    return abs(count - total * p) <= SIGMAS * math.sqrt(total * p * (1 - p))


def test_selection_rate_is_mask_prob_of_real_tokens():
    # Heavy, varying padding: a budget computed on the padded length would select ~25%.
    spec = make_spec(max_predictions=10_000)
    selected = real = 0
    for tokens_T, _, sample in sample_many(spec, 2000, length=256, min_real=100):
        n_real = n_real_of(tokens_T)
        n_selected = int((sample.labels != IGNORE_INDEX).sum())
        assert n_selected <= round(0.15 * n_real)
        selected, real = selected + n_selected, real + n_real
    # Not a sampling error: each sample takes round(0.15 n) tokens unless no span fits the
    # last few, so the rate is off by at most rounding, 0.5 / n_real <= 0.005.
    assert abs(selected / real - 0.15) <= 0.005


def test_cap_on_predictions_is_never_exceeded():
    spec = make_spec(max_predictions=20)
    counts = [
        int((s.labels != IGNORE_INDEX).sum())
        for *_, s in sample_many(spec, 2000, length=512, min_real=300)
    ]
    assert max(counts) == 20  # 15% of >= 300 tokens is at least 45: the cap binds
    assert np.mean(np.array(counts) == 20) > 0.99


def test_replacements_split_80_10_10():
    spec = make_spec(max_predictions=20)
    masked = kept = random = 0
    for _, _, sample in sample_many(spec, 3000, length=128, min_real=100):
        predicted_P = sample.labels != IGNORE_INDEX
        new_P, old_P = sample.input_ids[predicted_P], sample.labels[predicted_P]
        masked += int((new_P == MASK).sum())
        kept += int((new_P == old_P).sum())
        random += int(((new_P != MASK) & (new_P != old_P)).sum())
    total = masked + kept + random
    n_normal = VOCAB - len(SPECIALS)
    # A random draw that hits the original token reads as "unchanged".
    assert within(masked, total, 0.8)
    assert within(kept, total, 0.1 + 0.1 / n_normal)
    assert within(random, total, 0.1 * (1 - 1 / n_normal))


def test_random_replacements_are_uniform_over_normal_ids():
    # A special id inside the range (9) and the last id (13) check the id mapping's edges;
    # 9 also occurs in the text, where it must be left alone.
    specials = SPECIALS | {9}
    spec = make_spec(vocab_size=14, special_ids=specials)
    normal = [i for i in range(14) if i not in specials]
    counts_V = np.zeros(14, dtype=np.int64)
    for *_, sample in sample_many(spec, 3000, length=64, min_real=50, vocab=14):
        predicted_P = sample.labels != IGNORE_INDEX
        new_P, old_P = sample.input_ids[predicted_P], sample.labels[predicted_P]
        counts_V += np.bincount(new_P[(new_P != MASK) & (new_P != old_P)], minlength=14)
    assert counts_V[sorted(specials)].sum() == 0
    # Originals are uniform over the normal ids, so replacements that differ are too.
    total = int(counts_V.sum())
    assert all(within(int(counts_V[i]), total, 1 / len(normal)) for i in normal)


def test_special_tokens_are_never_selected_and_labels_mark_predictions():
    spec = make_spec(vocab_size=12, max_predictions=30)  # 5 of 12 ids special: easy to hit
    for tokens_T, _, sample in sample_many(spec, 1000, length=64, min_real=20, vocab=12):
        special_T = np.isin(tokens_T, sorted(SPECIALS))
        predicted_T = sample.labels != IGNORE_INDEX
        assert not (predicted_T & special_T).any()
        assert (sample.labels[predicted_T] == tokens_T[predicted_T]).all()
        assert (sample.input_ids[~predicted_T] == tokens_T[~predicted_T]).all()
        replaced_P = sample.input_ids[predicted_T]
        assert not np.isin(replaced_P[replaced_P != MASK], sorted(SPECIALS)).any()
        assert sample.input_ids.dtype == sample.labels.dtype == np.int64


def test_first_span_length_follows_inverse_n():
    # Later spans are biased short (longer ones collide with covered words more often and
    # shrink to fit the budget), but the first visited start is always accepted: its
    # length is exactly the drawn one, p(n) ∝ 1/n renormalised near the last word.
    spec = make_spec(max_ngram=3)
    p_N = np.array([6, 3, 2]) / 11
    p2_N = np.array([3 / 5, 2 / 5, 0])  # (1, 1/2) renormalised: two words left
    p1_N = np.array([1.0, 0, 0])  # the last word
    drawn_N, expected_N = np.zeros(3, dtype=np.int64), np.zeros(3)
    for tokens_T, word_start_T, sample in sample_many(spec, 4000, length=512, min_real=400):
        n_words = len(reference_words(tokens_T, word_start_T))
        assert round(0.15 * n_real_of(tokens_T)) >= 3 * 4  # three 4-piece words fit
        drawn_N[sample.span_lengths[0] - 1] += 1
        # The first start is uniform over the words.
        expected_N += ((n_words - 2) * p_N + p2_N + p1_N) / n_words
    total = int(drawn_N.sum())
    assert all(within(int(drawn_N[i]), total, expected_N[i] / total) for i in range(3))
    assert abs(expected_N / total - p_N).max() < 0.01  # the edge correction stays small


def test_span_over_budget_shrinks_instead_of_being_skipped():
    # Budget 2: a drawn 3-gram at the first start becomes a 2-gram, so P(first span is 2)
    # is p(2) + p(3) = 5/11; skipping it instead would give p(2) / (p(1) + p(2)) = 1/3.
    spec = make_spec(whole_word=False, max_predictions=2)
    n_words = 60
    tokens_T = np.array([CLS, *range(10, 10 + n_words), SEP])
    word_start_T = np.ones(len(tokens_T), dtype=bool)
    n_samples = 4000
    twos = sum(
        mask_tokens(tokens_T, word_start_T, spec, masking_rng(1, p)).span_lengths[0] == 2
        for p in range(n_samples)
    )
    # The last two starts have fewer words ahead: renormalised p(2) = 2/5, then none.
    p_two = ((n_words - 2) * 5 / 11 + 2 / 5) / n_words
    assert within(twos, n_samples, p_two)


def test_whole_words_are_selected_entirely_or_not_at_all():
    partial = {True: 0, False: 0}
    for whole_word in (True, False):
        spec = make_spec(whole_word=whole_word)
        for tokens_T, word_start_T, sample in sample_many(spec, 500, length=128, min_real=100):
            predicted_T = sample.labels != IGNORE_INDEX
            for word in reference_words(tokens_T, word_start_T):
                partial[whole_word] += 0 < predicted_T[word].sum() < len(word)
    assert partial[True] == 0
    assert partial[False] > 0  # the check above can see a split word


def test_continuation_after_special_token_starts_a_new_word():
    # [CLS] ▁a b [SEP] c d [SEP]: "c d" continues nothing, so it is a word of its own.
    tokens_T = np.array([CLS, 10, 11, SEP, 12, 13, SEP])
    word_start_T = np.array([True, True, False, True, False, False, True])
    spec = make_spec(mask_prob=0.5, max_ngram=1)  # budget 2 tokens: exactly one word
    seen = set()
    for position in range(50):
        sample = mask_tokens(tokens_T, word_start_T, spec, masking_rng(0, position))
        seen.add(tuple(np.flatnonzero(sample.labels != IGNORE_INDEX)))
        assert sample.span_lengths == [1]
    assert seen == {(1, 2), (4, 5)}


def test_without_whole_word_every_token_is_a_word():
    spec = make_spec(whole_word=False)
    rng = np.random.default_rng(3)
    for position in range(200):
        tokens_T, word_start_T = make_sequence(rng, 128, 120, unk_rate=0.02)
        samples = [
            mask_tokens(tokens_T, ws_T, spec, masking_rng(0, position))
            for ws_T in (word_start_T, np.ones_like(word_start_T), np.zeros_like(word_start_T))
        ]
        # Word boundaries are ignored, and spans count tokens.
        assert all(np.array_equal(s.input_ids, samples[0].input_ids) for s in samples)
        assert all(np.array_equal(s.labels, samples[0].labels) for s in samples)
        assert sum(samples[0].span_lengths) == (samples[0].labels != IGNORE_INDEX).sum()
        # Same as whole words where every piece starts a word.
        whole = mask_tokens(
            tokens_T, np.ones_like(word_start_T), make_spec(), masking_rng(0, position)
        )
        assert np.array_equal(whole.input_ids, samples[0].input_ids)


def mask_at(tokens_T: np.ndarray, word_start_T: np.ndarray, seed: int, position: int):
    sample = mask_tokens(tokens_T, word_start_T, make_spec(), masking_rng(seed, position))
    return sample.input_ids.tobytes() + sample.labels.tobytes()


def test_masking_depends_only_on_seed_and_position():
    tokens_T, word_start_T = make_sequence(np.random.default_rng(0), 512, 509)
    in_order = [mask_at(tokens_T, word_start_T, 7, p) for p in range(50)]
    assert len(set(in_order)) == 50  # every position (epoch) masks differently
    # Any order, with unrelated randomness in between, gives the same mask per position.
    np.random.seed(123)
    for p in np.random.permutation(50).tolist():
        np.random.random(10)
        masking_rng(7, p + 1000).random(10)
        assert mask_at(tokens_T, word_start_T, 7, p) == in_order[p]
    assert mask_at(tokens_T, word_start_T, 8, 0) != in_order[0]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"whole_word": False, "max_ngram": 1, "mask_prob": 0.4},
        {"max_predictions": 3},
        {"mask_prob": 0.0},
        {"mask_prob": 1.0, "max_ngram": 5},
    ],
    ids=["albert", "token-level", "capped", "nothing", "everything"],
)
def test_a_batch_masks_each_row_as_mask_tokens_does(overrides):
    spec = make_spec(**overrides)
    rng = np.random.default_rng(3)
    rows = [make_sequence(rng, 96, int(rng.integers(2, 93)), unk_rate=0.05) for _ in range(24)]
    rows[5] = (np.full(96, PAD, dtype=np.int64), np.ones(96, dtype=bool))  # nothing real
    tokens_BT = np.stack([t for t, _ in rows])
    word_start_BT = np.stack([w for _, w in rows])
    positions_B = np.arange(500, 524)
    keys_B2 = np.stack([np.full(24, 7), positions_B], axis=1)
    input_ids_BT, labels_BT = mask_batch(tokens_BT, word_start_BT, spec, generators(keys_B2))
    for b, position in enumerate(positions_B.tolist()):
        one = mask_tokens(tokens_BT[b], word_start_BT[b], spec, masking_rng(7, position))
        assert np.array_equal(input_ids_BT[b], one.input_ids), b
        assert np.array_equal(labels_BT[b], one.labels), b
    assert (labels_BT != IGNORE_INDEX).any() == (spec.mask_prob > 0)


def test_masking_rng_is_seeded_from_seed_and_position():
    expected = np.random.default_rng(np.random.SeedSequence([7, 3])).random(4)
    assert np.array_equal(masking_rng(7, 3).random(4), expected)


def test_same_rng_state_gives_same_sample_and_leaves_input_alone():
    tokens_T, word_start_T = make_sequence(np.random.default_rng(0), 128, 120)
    before_T = tokens_T.copy()
    a = mask_tokens(tokens_T, word_start_T, make_spec(), np.random.default_rng(5))
    b = mask_tokens(tokens_T, word_start_T, make_spec(), np.random.default_rng(5))
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert a.span_lengths == b.span_lengths
    assert np.array_equal(tokens_T, before_T)


@pytest.mark.parametrize(
    ("tokens", "mask_prob"),
    [([CLS, SEP, PAD, PAD], 0.15), ([], 0.15), ([CLS, 10, 11, SEP], 0.0)],
    ids=["only-specials", "empty", "mask-prob-zero"],
)
def test_nothing_to_mask_returns_the_input(tokens, mask_prob):
    tokens_T = np.array(tokens, dtype=np.int64)
    spec = make_spec(mask_prob=mask_prob)
    sample = mask_tokens(tokens_T, np.ones(len(tokens), dtype=bool), spec, masking_rng(0, 0))
    assert np.array_equal(sample.input_ids, tokens_T)
    assert (sample.labels == IGNORE_INDEX).all() and sample.span_lengths == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_prob": 1.5}, r"mask_prob \(1.5\) must be in \[0, 1\]"),
        ({"max_ngram": 0}, r"max_ngram \(0\) must be >= 1"),
        ({"mask_id": 7}, r"mask_id \(7\) must be in special_ids"),
        ({"special_ids": SPECIALS | {VOCAB}}, r"special_ids \[1000\] lie outside"),
        ({"vocab_size": 5}, "special_ids cover the whole vocabulary"),
    ],
)
def test_spec_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_spec(**overrides)


def test_spec_accepts_a_plain_set_of_special_ids():
    spec = make_spec(special_ids=set(SPECIALS))
    assert isinstance(spec.special_ids, frozenset)
    assert dataclasses.replace(spec) == spec
