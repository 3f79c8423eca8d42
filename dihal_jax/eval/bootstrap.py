"""95% bootstrap confidence intervals over samples (`scipy.stats.bootstrap`, seeded).

A row's samples are the unit of resampling. With 32-128 samples the intervals are
wide: a difference inside overlapping intervals is no difference.

- Perplexities resample rows with their (NLL sum, scored-token count) pairs and stay
  token-weighted, exp(Σ nll / Σ count); BCa interval.
- Unigram entropy resamples rows and pools their tokens. A resample repeats some rows
  and drops others, so it holds fewer distinct tokens and its plug-in entropy is lower:
  on real and Zipfian text every resample falls below the estimate, BCa is undefined
  and the percentile interval excludes the estimate. The interval is therefore the
  normal bootstrap interval, estimate ± z·SE, with SE the bootstrap standard error.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.stats

RESAMPLES = 1000
CONFIDENCE = 0.95


def _bootstrap(data: tuple, statistic, seed: int, paired: bool, method: str):
  return scipy.stats.bootstrap(data, statistic, paired=paired, vectorized=True,
                               n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method=method,
                               batch=100, rng=np.random.default_rng(seed))


def perplexity_ci(nll, count, seed: int = 0) -> list[float]:
  """[lo, hi] of exp(Σ nll / Σ count) with rows (nll_i, count_i) resampled together."""
  nll, count = np.asarray(nll, np.float64), np.asarray(count, np.float64)

  def statistic(a, b, axis=-1):
    return np.exp(np.sum(a, axis=axis) / np.sum(b, axis=axis))

  if len(nll) < 2:
    return [float("nan"), float("nan")]
  if np.ptp(nll / count) == 0:  # every row scores the same (a collapsed generator)
    value = float(statistic(nll, count))
    return [value, value]
  ci = _bootstrap((nll, count), statistic, seed, paired=True, method="BCa").confidence_interval
  return [float(ci.low), float(ci.high)]


def entropy_ci(seqs, seed: int = 0) -> list[float]:
  """[lo, hi] = H ± z·SE of the pooled unigram entropy H (nats), rows resampled."""
  rows = [np.asarray(r).ravel() for r in seqs]
  if len(rows) < 2:
    return [float("nan"), float("nan")]
  _, inverse = np.unique(np.concatenate(rows), return_inverse=True)
  owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
  counts = scipy.sparse.csr_matrix((np.ones(len(owner)), (owner, inverse.ravel())))  # [N, U]

  def statistic(idx, axis=-1):
    idx = np.moveaxis(np.asarray(idx, np.int64), axis, -1)
    flat = idx.reshape(-1, idx.shape[-1])
    weights = np.zeros((len(flat), len(rows)))
    np.add.at(weights, (np.arange(len(flat))[:, None], flat), 1.0)
    pooled = np.asarray((counts.T @ weights.T).T)  # [B, U]
    p = pooled / pooled.sum(axis=1, keepdims=True)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return h.reshape(idx.shape[:-1])

  estimate = float(statistic(np.arange(len(rows))))
  res = _bootstrap((np.arange(len(rows)),), statistic, seed, paired=False, method="percentile")
  half = float(scipy.stats.norm.ppf(0.5 + CONFIDENCE / 2) * res.standard_error)
  return [estimate - half, estimate + half]
