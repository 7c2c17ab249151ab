"""Dynamic ALBERT-style masked-LM masking (n-gram, whole-word), numpy only.

Follows `create_masked_lm_predictions` of google-research/albert, applied on the fly in the
data loader instead of once when the data is written, so that every epoch sees a new mask.
Deliberate departures from that script:

- special tokens are never candidates and never random replacements, and the budget counts
  real (non-special) tokens, not the padded length;
- a continuation piece right after a special token starts its own word (the original glues
  it onto the word before [SEP]);
- an n-gram is drawn only among the lengths that fit before the last word, with p(n) ∝ 1/n
  renormalised over them (the original draws from all n and cuts the span at the last word).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pretrain.labels import IGNORE_INDEX

_MASK_FRACTION = 0.8  # of the selected tokens become [MASK] ...
_KEEP_FRACTION = 0.1  # ... stay unchanged, and the remaining 0.1 become a random token
_REPLACE_FROM = _MASK_FRACTION + _KEEP_FRACTION


@dataclass(frozen=True)
class MaskingSpec:
    """What to mask and how; one per run, shared by every sample."""

    mask_prob: float
    """Fraction of real (non-special) tokens to predict, e.g. 0.15."""
    max_predictions: int
    """Cap on predicted tokens per sequence, e.g. 20 for 512 tokens."""
    max_ngram: int
    """Spans cover 1..max_ngram consecutive words, with p(n) ∝ 1/n."""
    whole_word: bool
    """True: a word is a word-start piece plus its continuation pieces; False: one token."""
    mask_id: int
    """Id of [MASK]."""
    vocab_size: int
    """Random replacements are drawn from [0, vocab_size) minus `special_ids`."""
    special_ids: frozenset[int]
    """Never predicted, never a random replacement: [PAD], [CLS], [SEP], [MASK], <unk>, ..."""

    def __post_init__(self) -> None:
        # Accept any iterable of ids; the frozenset keeps the spec hashable (a cache key).
        object.__setattr__(self, "special_ids", frozenset(self.special_ids))
        _check(0.0 <= self.mask_prob <= 1.0, f"mask_prob ({self.mask_prob}) must be in [0, 1]")
        _check(self.max_predictions >= 0, f"max_predictions ({self.max_predictions}) must be >= 0")
        _check(self.max_ngram >= 1, f"max_ngram ({self.max_ngram}) must be >= 1")
        outside = sorted(i for i in self.special_ids if not 0 <= i < self.vocab_size)
        _check(not outside, f"special_ids {outside} lie outside [0, vocab_size={self.vocab_size})")
        # Otherwise an input [MASK] could become a target and [MASK] a "random" token.
        _check(self.mask_id in self.special_ids, f"mask_id ({self.mask_id}) must be in special_ids")
        _check(
            len(self.special_ids) < self.vocab_size,
            "special_ids cover the whole vocabulary: no token left to draw random replacements",
        )


@dataclass
class MaskedSample:
    """One masked sequence, ready to collate."""

    input_ids: np.ndarray
    """int64 (T,): the tokens after replacement."""
    labels: np.ndarray
    """int64 (T,): the original token where predicted, IGNORE_INDEX (-100) elsewhere."""
    span_lengths: list[int]
    """Length in words of every accepted span, in the order they were accepted."""


def masking_rng(seed: int, position: int) -> np.random.Generator:
    """Generator for the sample at a global position in the stream of a run.

    Keyed only on (seed, position), so a resumed run masks a sample exactly as an
    uninterrupted one would, and since the position keeps growing across epochs, the same
    text is masked differently in each epoch.
    """
    _check(seed >= 0 and position >= 0, f"seed ({seed}) and position ({position}) must be >= 0")
    return np.random.default_rng(np.random.SeedSequence([seed, position]))


def mask_tokens(
    tokens: np.ndarray, word_start: np.ndarray, spec: MaskingSpec, rng: np.random.Generator
) -> MaskedSample:
    """Choose n-gram spans of words to predict and corrupt them 80/10/10.

    Args:
        tokens: int (T,), a full sequence including [CLS]/[SEP]/[PAD].
        word_start: bool (T,), True where a token begins a word (SentencePiece pieces that
            start with '▁'); ignored when `spec.whole_word` is False.
        spec: the masking settings.
        rng: the only source of randomness; see `masking_rng`.
    """
    tokens_T = np.asarray(tokens)
    word_start_T = np.asarray(word_start, dtype=bool)
    _check(
        tokens_T.ndim == 1 and word_start_T.shape == tokens_T.shape,
        f"tokens {tokens_T.shape} and word_start {word_start_T.shape} must be matching 1-D",
    )
    span_lengths: list[int] = []
    input_ids_BT, labels_BT = mask_batch(
        tokens_T[None], word_start_T[None], spec, [rng], spans=[span_lengths]
    )
    input_ids_T, labels_T = input_ids_BT[0], labels_BT[0]
    return MaskedSample(input_ids=input_ids_T, labels=labels_T, span_lengths=span_lengths)


def mask_batch(
    tokens_BT: np.ndarray,
    word_start_BT: np.ndarray,
    spec: MaskingSpec,
    rngs: Iterable[np.random.Generator],
    spans: list[list[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_tokens` over a micro-batch: row b masked with the b-th generator of `rngs`,
    as a sample alone would be (its draws come from its generator only, in its order).

    Words, budgets and the corruption are computed for all rows at once; only the visit of
    start words (a short loop over each row's own random order) runs per row. With
    `spans`, one list per row, each row's accepted span lengths are appended to its list.
    Returns int64 (B, T) input ids and labels.
    """
    tokens_BT = np.asarray(tokens_BT)
    B, T = tokens_BT.shape
    real_BT = ~_special_table(spec)[tokens_BT]
    if spec.whole_word:
        prev_real_BT = np.zeros_like(real_BT)
        prev_real_BT[:, 1:] = real_BT[:, :-1]
        starts_BT = real_BT & (np.asarray(word_start_BT, dtype=bool) | ~prev_real_BT)
    else:
        starts_BT = real_BT
    # Words numbered across the batch: row b's words are first_W[b] .. first_W[b+1] - 1.
    words_B = starts_BT.sum(axis=1)
    first_W = np.concatenate(([0], np.cumsum(words_B)))
    word_of_R = np.cumsum(starts_BT.ravel())[real_BT.ravel()] - 1
    word_len_W = np.bincount(word_of_R, minlength=int(first_W[-1]))
    n_real_B = real_BT.sum(axis=1).tolist()
    first_words = first_W.tolist()
    cum = [0, *np.cumsum(word_len_W).tolist()]
    covered = [False] * len(word_len_W)
    u_parts, random_parts = [], []
    for b, rng in zip(range(B), rngs, strict=True):
        lo, n_words = first_words[b], first_words[b + 1] - first_words[b]
        budget = _num_to_predict(n_real_B[b], spec)
        n_selected = 0
        if budget and n_words:
            starts, ngrams = _draw_spans(n_words, spec.max_ngram, rng)
            row_spans = spans[b] if spans is not None else None
            n_selected = _visit(starts, ngrams, cum, covered, lo, budget, row_spans)
        # The corruption's draws: one uniform per selected token, then the random ids.
        u_P = rng.random(n_selected)
        u_parts.append(u_P)
        random_parts.append(_random_normal_ids(int((u_P >= _REPLACE_FROM).sum()), spec, rng))
    covered_W = np.array(covered, dtype=bool)
    selected_BT = np.zeros(B * T, dtype=bool)
    selected_BT[real_BT.ravel()] = covered_W[word_of_R]
    selected_BT = selected_BT.reshape(B, T)
    labels_BT = np.where(selected_BT, tokens_BT, IGNORE_INDEX).astype(np.int64)
    input_ids_BT = tokens_BT.astype(np.int64, copy=True)
    # Row-major positions: each row's selected tokens in order, as its draws were made.
    selected_P = np.flatnonzero(selected_BT)
    u_P = np.concatenate(u_parts) if u_parts else np.zeros(0)
    flat_P = input_ids_BT.reshape(-1)
    flat_P[selected_P[u_P < _MASK_FRACTION]] = spec.mask_id
    flat_P[selected_P[u_P >= _REPLACE_FROM]] = np.concatenate(random_parts or [np.zeros(0, int)])
    return input_ids_BT, labels_BT


def _num_to_predict(n_real: int, spec: MaskingSpec) -> int:
    """The token budget: mask_prob of the real tokens, at least 1, at most the cap."""
    if n_real == 0 or spec.mask_prob == 0.0:
        return 0
    # Python 3's round (half to even), as the original script gets.
    return min(spec.max_predictions, max(1, round(n_real * spec.mask_prob)))


def _draw_spans(n_words: int, max_ngram: int, rng: np.random.Generator) -> tuple[list, list]:
    """The start words in the order they are visited, and a span length drawn for each."""
    start_S = rng.permutation(n_words)
    ngram_S = _draw_ngrams(np.minimum(max_ngram, n_words - start_S), rng)
    return start_S.tolist(), ngram_S.tolist()


def _visit(
    starts: list[int],
    ngrams: list[int],
    cum: list[int],
    covered: list[bool],
    base: int,
    budget: int,
    spans: list[int] | None = None,
) -> int:
    """Cover spans of words base + s .. base + s + n - 1 while the token budget lasts (cum:
    cumulative word lengths, covered: marked in place); returns the tokens selected.
    Plain Python: the loop is short and numpy scalar access would dominate it."""
    n_selected = 0
    for s, n in zip(starts, ngrams, strict=True):
        if n_selected >= budget:
            break
        s += base
        while n > 0 and n_selected + cum[s + n] - cum[s] > budget:
            n -= 1  # try a shorter span before giving up on this start
        if n == 0 or any(covered[s : s + n]):
            continue
        covered[s : s + n] = [True] * n
        n_selected += cum[s + n] - cum[s]
        if spans is not None:
            spans.append(n)
    return n_selected


def _draw_ngrams(available_S: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One span length per start, p(n) ∝ 1/n over n <= the words available there."""
    cdf_KN = _ngram_cdf(int(available_S.max()))
    u_S = rng.random(len(available_S))
    # Inverse CDF: n - 1 is the number of cumulative probabilities that u has passed.
    return (u_S[:, None] >= cdf_KN[available_S - 1]).sum(axis=1) + 1


@functools.lru_cache(maxsize=16)
def _ngram_cdf(max_ngram: int) -> np.ndarray:
    """Row k-1: CDF of the span length when k words are available, padded with 1.0."""
    p_N = 1.0 / np.arange(1, max_ngram + 1)
    cdf_KN = np.ones((max_ngram, max_ngram))
    for k in range(1, max_ngram + 1):
        cdf_KN[k - 1, : k - 1] = np.cumsum(p_N[: k - 1]) / p_N[:k].sum()
    # The last entry of each row stays exactly 1.0 so that u < 1 never runs past k.
    cdf_KN.flags.writeable = False
    return cdf_KN


def _random_normal_ids(n: int, spec: MaskingSpec, rng: np.random.Generator) -> np.ndarray:
    """n ids uniform over [0, vocab_size) minus special_ids, without building that set."""
    specials_K = _specials_array(spec.special_ids)
    r_R = rng.integers(0, spec.vocab_size - len(specials_K), size=n)
    # The r-th normal id is r plus the number of specials below it, and the k-th special is
    # below it exactly when the specials_K[k] - k normal ids under that special are <= r.
    return r_R + np.searchsorted(specials_K - np.arange(len(specials_K)), r_R, side="right")


@functools.lru_cache(maxsize=16)
def _special_table(spec: MaskingSpec) -> np.ndarray:
    """bool (vocab_size,): True at the special ids (a lookup, where np.isin sorts)."""
    table_V = np.zeros(spec.vocab_size, dtype=bool)
    table_V[_specials_array(spec.special_ids)] = True
    table_V.flags.writeable = False
    return table_V


@functools.lru_cache(maxsize=16)
def _specials_array(special_ids: frozenset[int]) -> np.ndarray:
    """The special ids, sorted, as a read-only int64 array."""
    specials_K = np.array(sorted(special_ids), dtype=np.int64)
    specials_K.flags.writeable = False
    return specials_K


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
