"""Calibration rows: what a trivial generator scores under each judge.

`unigram_sampler` draws every token independently from the train split's token
frequencies; `bigram_sampler` draws token t from the train split's successors of
token t - 1 (a token never followed in training restarts from the unigram
frequencies). A method that does not beat the bigram sampler under the n-gram
judge is not yet language. Both are fit on the same train windows as the n-gram
judge; the start token is given, like every generator's.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class CountSampler:
  """Unigram and bigram frequencies of the train windows (bigrams within a window only)."""
  unigram: np.ndarray  # [V] counts of the body tokens (position 0, the separator, excluded)
  successors: np.ndarray  # bigram (prev, next) pairs as keys prev * V + next, sorted
  successor_counts: np.ndarray  # counts of those pairs
  vocab: int

  @classmethod
  def fit(cls, windows: np.ndarray, vocab_size: int) -> "CountSampler":
    windows = np.asarray(windows, np.int64)
    unigram = np.bincount(windows[:, 1:].ravel(), minlength=vocab_size).astype(np.float64)
    pairs = windows[:, :-1] * vocab_size + windows[:, 1:]
    keys, counts = np.unique(pairs.ravel(), return_counts=True)
    return cls(unigram, keys, counts.astype(np.float64), vocab_size)

  def unigram_sample(self, rng: np.random.Generator, start: np.ndarray, length: int) -> np.ndarray:
    """[N, length]: the given start [N, s] followed by independent unigram draws."""
    start = np.asarray(start, np.int64)
    draws = rng.choice(self.vocab, size=(len(start), length - start.shape[1]),
                       p=self.unigram / self.unigram.sum())
    return np.concatenate([start, draws], axis=1).astype(np.int32)

  def bigram_sample(self, rng: np.random.Generator, start: np.ndarray, length: int) -> np.ndarray:
    """[N, length]: the given start [N, s] continued token by token from bigram counts."""
    tokens = [np.asarray(start, np.int64)[:, i] for i in range(np.shape(start)[1])]
    cumulative = np.cumsum(self.successor_counts)
    prev_of = self.successors // self.vocab
    lo = np.searchsorted(prev_of, np.arange(self.vocab), side="left")
    hi = np.searchsorted(prev_of, np.arange(self.vocab), side="right")
    unigram_p = self.unigram / self.unigram.sum()
    for _ in range(length - len(tokens)):
      prev = tokens[-1]
      a, b = lo[prev], hi[prev]
      seen = b > a
      base = np.where(a > 0, cumulative[np.maximum(a - 1, 0)], 0.0)
      total = np.where(seen, cumulative[np.maximum(b - 1, 0)] - base, 1.0)
      u = base + rng.random(len(prev)) * total  # a point in prev's slice of the cumulative
      pick = np.searchsorted(cumulative, u, side="right")
      nxt = np.where(seen, self.successors[np.minimum(pick, len(cumulative) - 1)] % self.vocab,
                     rng.choice(self.vocab, size=len(prev), p=unigram_p))
      tokens.append(nxt)
    return np.stack(tokens, axis=1).astype(np.int32)
