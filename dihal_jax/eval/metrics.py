"""Metrics of generated samples (docs/design.md, "Evaluation protocol"), as pure functions.

Token sequences (`seqs`) are a list of int sequences (lengths may differ) or an
int array [N, T], one row per sequence; ids must lie in 0..2^32-1. n-grams are
the length-n windows of one sequence (never across sequences); a sequence of
length L has max(L - n + 1, 0) of them. Ratios whose denominator is empty are 0.0.

- distinct_n(seqs, n) = |set of all n-grams, pooled| / (number of n-grams,
  pooled, with multiplicity)                       (Li et al. 2016).
- rep_n(seq, n) = 1 - |set of seq's n-grams| / (number of seq's n-grams);
  diversity(seqs) = mean over sequences of prod_{n=2..4} (1 - rep_n(seq, n))
  (the SimCTG / MAUVE definition; a sequence shorter than n has rep_n = 0).
- unigram_entropy(seqs) = -sum_v p_v ln p_v, p_v = pooled frequency of token v
  (nats).
- memorization(seqs, ngram_set(train, n), n) = share of the generated n-grams,
  counted with multiplicity, that occur anywhere in the training sequences.
  n-grams are packed as n big-endian uint32 ids into one numpy void key, so
  `np.unique` / `np.isin` stay exact for any vocabulary and ~1M training
  tokens take well under a second.
- gen_ppl(model, tokens, mask) = exp(sum NLL / number of scored tokens), where
  NLL_t = -ln softmax(logits_{t-1})[token_t] under the backbone `Decoder`, and
  position t of a row is scored iff t >= score_from (default 1) and mask[t] and
  mask[t-1] (so the start token, padding and, with left padding, the first real
  token are not scored). Token-weighted over the whole set, not a mean of per-row
  PPLs; the per-row sums come back too, for bootstrap intervals.
- spread_ratio(generated, real) = sqrt(mean_c var_gen[c]) / sqrt(mean_c var_real[c])
  for arrays [..., d]: var[c] is channel c's population variance (ddof 0) over
  every leading index pooled; i.e. the ratio of RMS per-channel stds. 1 = the
  data's spread, < 1 = over-smoothed samples.
- token_accuracy(pred, target, mask) = share of positions (where mask is True)
  with pred == target.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dihal_jax.backbone.model import Decoder


def _rows(seqs) -> list[np.ndarray]:
  """seqs -> list of 1-D int64 arrays (checked)."""
  rows = [np.asarray(s) for s in seqs]
  for r in rows:
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
      raise ValueError(f"expected sequences of int ids, got a row of shape {r.shape}, {r.dtype}")
    if r.size and (r.min() < 0 or r.max() >= 2**32):
      raise ValueError(f"token ids must lie in 0..2^32-1, got {r.min()}..{r.max()}")
  return [r.astype(np.int64) for r in rows]


def _ngrams(rows: list[np.ndarray], n: int) -> np.ndarray:
  """Every n-gram of the rows, with multiplicity, as void keys [M] of 4n bytes."""
  if n < 1:
    raise ValueError(f"n={n}: expected >= 1")
  key = np.dtype((np.void, 4 * n))
  parts = [np.lib.stride_tricks.sliding_window_view(r, n) for r in rows if len(r) >= n]
  if not parts:
    return np.empty(0, key)
  grams = np.ascontiguousarray(np.concatenate(parts).astype(">u4"))
  return grams.view(key).ravel()


def _ratio(num: float, den: float) -> float:
  return float(num) / float(den) if den else 0.0


def distinct_n(seqs, n: int) -> float:
  """Unique n-grams / total n-grams, pooled over all sequences (0.0 if none)."""
  grams = _ngrams(_rows(seqs), n)
  return _ratio(len(np.unique(grams)), len(grams))


def rep_n(seq, n: int) -> float:
  """1 - unique / total n-grams within one sequence (0.0 if shorter than n)."""
  grams = _ngrams(_rows([seq]), n)
  return 1.0 - _ratio(len(np.unique(grams)), len(grams)) if len(grams) else 0.0


def diversity(seqs) -> float:
  """Mean over sequences of prod_{n=2..4} (1 - rep_n) (0.0 for no sequences)."""
  rows = _rows(seqs)
  scores = [np.prod([1.0 - rep_n(r, n) for n in (2, 3, 4)]) for r in rows]
  return float(np.mean(scores)) if scores else 0.0


def unigram_entropy(seqs) -> float:
  """Shannon entropy (nats) of the pooled token frequencies (0.0 for no tokens)."""
  rows = _rows(seqs)
  tokens = np.concatenate(rows) if rows else np.empty(0, np.int64)
  if not tokens.size:
    return 0.0
  p = np.unique(tokens, return_counts=True)[1] / tokens.size
  return float(-np.sum(p * np.log(p)))


def ngram_set(seqs, n: int = 4) -> np.ndarray:
  """The sorted unique n-grams of `seqs` (void keys), for `memorization`."""
  return np.unique(_ngrams(_rows(seqs), n))


def memorization(seqs, train_ngrams: np.ndarray, n: int = 4) -> float:
  """Share of generated n-grams (with multiplicity) in `train_ngrams` = ngram_set(train, n)."""
  if train_ngrams.dtype.itemsize != 4 * n:
    raise ValueError(f"train_ngrams hold {train_ngrams.dtype.itemsize // 4}-grams, not {n}-grams")
  grams = _ngrams(_rows(seqs), n)
  return _ratio(np.isin(grams, train_ngrams).sum(), len(grams))


@functools.partial(jax.jit, static_argnames=("graphdef", "score_from"))
def _nll_rows(graphdef, state, tokens, mask, score_from):
  """Per row: (sum of NLL over scored positions, number of scored positions) for one batch."""
  model: Decoder = nnx.merge(graphdef, state)
  # Default positions 0..T-1 also serve left padding: RoPE scores depend on offsets only.
  logits = model(tokens, mask=mask)[:, :-1]
  target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target
  scored = mask[:, 1:] & mask[:, :-1] & (jnp.arange(1, tokens.shape[1]) >= score_from)
  return jnp.sum(jnp.where(scored, nll, 0.0), axis=1), jnp.sum(scored, axis=1)


def gen_ppl(model: Decoder, tokens, mask=None, *, batch_size: int = 8,
            score_from: int = 1) -> dict:
  """Generative perplexity of `tokens` [N, T] (start token first) under `model`.

  Args:
    model: the scoring backbone (or judge) `Decoder`.
    tokens: [N, T] int ids, each row starting with the start / separator token.
    mask: [N, T] bool, True = real token (default: all real).
    batch_size: rows per jitted forward; the last batch is padded with masked rows.
    score_from: only positions t >= score_from are scored (a continuation after a given
      prefix of that many tokens); earlier ones are context.
  Returns:
    {"gen_ppl": exp(nll_sum / tokens), "nll_sum": float (nats), "tokens": int scored,
     "row_nll": [N] float64, "row_tokens": [N] int (per row, for bootstrap intervals)}.
  """
  tokens = np.asarray(tokens, np.int32)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
  chex.assert_rank(tokens, 2)
  chex.assert_equal_shape([tokens, mask])
  n, t = tokens.shape
  b = max(1, min(batch_size, n))
  pad = -n % b
  tokens = np.concatenate([tokens, np.zeros((pad, t), np.int32)])
  mask = np.concatenate([mask, np.zeros((pad, t), bool)])
  graphdef, state = nnx.split(model)
  row_nll, row_tokens = [], []
  for i in range(0, n + pad, b):
    s, c = _nll_rows(graphdef, state, jnp.asarray(tokens[i:i + b]), jnp.asarray(mask[i:i + b]),
                     max(1, score_from))
    row_nll.append(np.asarray(s, np.float64))
    row_tokens.append(np.asarray(c))
  row_nll, row_tokens = np.concatenate(row_nll)[:n], np.concatenate(row_tokens)[:n]
  nll_sum, count = float(row_nll.sum()), int(row_tokens.sum())
  if not count:
    raise ValueError("gen_ppl: no scored tokens (rows need >= 2 real tokens)")
  return {"gen_ppl": float(np.exp(nll_sum / count)), "nll_sum": nll_sum, "tokens": count,
          "row_nll": row_nll, "row_tokens": row_tokens}


def spread_ratio(generated, real) -> float:
  """sqrt(mean_c var_gen[c]) / sqrt(mean_c var_real[c]) for arrays [..., d] (float64).

  Pass states without position 0 (the constant start state) unless it is meant to count.
  """
  generated, real = np.asarray(generated), np.asarray(real)
  if generated.shape[-1:] != real.shape[-1:]:
    raise ValueError(f"channel dims differ: {generated.shape} vs {real.shape}")

  def rms_std(x):
    return np.sqrt(np.mean(np.var(x.reshape(-1, x.shape[-1]), axis=0, dtype=np.float64)))

  return float(rms_std(generated) / rms_std(real))


def token_accuracy(pred, target, mask=None) -> float:
  """Share of positions with pred == target, over mask True (default all; 0.0 if none)."""
  pred, target = np.asarray(pred), np.asarray(target)
  mask = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
  chex.assert_equal_shape([pred, target, mask])
  return _ratio(np.sum((pred == target) & mask), np.sum(mask))
