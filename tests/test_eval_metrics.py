"""Evaluation metrics against hand-worked answers, naive Python and `transformers`."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dihal_jax.backbone.convert import load_model
from dihal_jax.eval import metrics
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

A = [1, 2, 1, 2, 1, 2]  # bigrams 12 21 12 21 12: 2/5 unique; trigrams 2/4; 4-grams 2/3
B = [1, 2, 3, 4, 5]     # every n-gram unique


def _naive_grams(seqs, n):
  return [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]


def _ragged(rng, rows, vocab, max_len):
  return [rng.integers(0, vocab, rng.integers(0, max_len)).tolist() for _ in range(rows)]


def test_rep_n_and_diversity_by_hand():
  np.testing.assert_allclose([metrics.rep_n(A, n) for n in (2, 3, 4)], [0.6, 0.5, 1 / 3])
  assert metrics.rep_n(B, 2) == 0.0
  assert metrics.rep_n([7, 7], 4) == 0.0                      # shorter than n: rep_n = 0
  np.testing.assert_allclose(metrics.diversity([A]), 0.4 * 0.5 * (2 / 3))  # = 2/15
  np.testing.assert_allclose(metrics.diversity([A, B, [7]]), (2 / 15 + 1 + 1) / 3)
  np.testing.assert_allclose(metrics.diversity(np.array([A, A])), 2 / 15)  # [N, T] array


def test_distinct_n_by_hand_and_against_naive():
  assert metrics.distinct_n([A, B], 1) == 5 / 11  # 11 tokens, ids 1..5
  assert metrics.distinct_n([A, B], 2) == 5 / 9   # 12 21 | 12 23 34 45: 9 bigrams, 5 kinds
  assert metrics.distinct_n([[1, 2]], 3) == 0.0   # no trigrams
  rng = np.random.default_rng(0)
  for vocab in (3, 20, 70000):
    seqs = _ragged(rng, 40, vocab, 30)
    for n in (1, 2, 3, 4):
      grams = _naive_grams(seqs, n)
      assert metrics.distinct_n(seqs, n) == len(set(grams)) / len(grams)


def test_unigram_entropy_by_hand_and_against_scipy():
  np.testing.assert_allclose(metrics.unigram_entropy([A]), math.log(2))
  # p = 1/2, 1/4, 1/4: 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2
  np.testing.assert_allclose(metrics.unigram_entropy([[1, 1], [2, 3]]), 1.5 * math.log(2))
  assert metrics.unigram_entropy([[5, 5, 5]]) == 0.0
  scipy_stats = pytest.importorskip("scipy.stats")
  seqs = _ragged(np.random.default_rng(1), 30, 50, 40)
  counts = np.bincount(np.concatenate(seqs).astype(int))
  np.testing.assert_allclose(metrics.unigram_entropy(seqs), scipy_stats.entropy(counts),
                             rtol=1e-12)


def test_memorization_by_hand():
  train = metrics.ngram_set([[1, 2, 3, 4, 5], [70000, 49151, 8, 9]])  # 3 4-grams
  assert len(train) == 3
  # 1234 yes, 2345 yes, 3451 no | 9234 no, 2345 yes -> 3/5
  assert metrics.memorization([[1, 2, 3, 4, 5, 1], [9, 2, 3, 4, 5]], train) == 3 / 5
  # with multiplicity: 1234 yes, 2341 no, 3412 no, 4123 no, 1234 yes -> 2/5
  assert metrics.memorization([[1, 2, 3, 4, 1, 2, 3, 4]], train) == 2 / 5
  assert metrics.memorization([[70000, 49151, 8, 9]], train) == 1.0
  assert metrics.memorization([[49151, 70000, 8, 9]], train) == 0.0  # order matters
  empty = metrics.ngram_set([[1, 2, 3], [4, 5, 6]])  # no 4-gram crosses a row boundary
  assert len(empty) == 0 and metrics.memorization([[1, 2, 3, 4]], empty) == 0.0
  with pytest.raises(ValueError):
    metrics.memorization([[1, 2, 3]], metrics.ngram_set([[1, 2, 3]], n=3), n=4)


def test_memorization_large_against_naive():
  """A train split of SmolLM2's size (803k tokens, vocab 49152)."""
  rng = np.random.default_rng(2)
  train = rng.integers(0, 49152, (1568, 512))
  copied = [train[r, s:s + 100].copy() for r, s in zip(rng.integers(0, 1568, 30),
                                                rng.integers(0, 400, 30))]
  for row in copied[:15]:  # corrupt some tokens so that partial overlaps occur
    row[rng.integers(0, 100, 5)] = rng.integers(0, 49152, 5)
  gen = [*copied, *rng.integers(0, 49152, (30, 100))]
  naive_train = set(_naive_grams(train.tolist(), 4))
  naive_gen = _naive_grams([g.tolist() for g in gen], 4)
  expected = sum(g in naive_train for g in naive_gen) / len(naive_gen)
  assert 0.3 < expected < 0.5
  train_set = metrics.ngram_set(train)
  assert len(train_set) == len(naive_train)
  assert metrics.memorization(gen, train_set) == expected


@pytest.mark.slow
def test_gen_ppl_matches_transformers(tiny_checkpoints):
  path = tiny_checkpoints["tiny_llama"]
  model = load_model(path, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES)
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, model.cfg.vocab_size, (5, 40)).astype(np.int32)
  tokens[:, 0] = 1  # start token
  lengths = np.array([40, 25, 40, 1, 33])
  mask = np.arange(40)[None] < lengths[:, None]  # right padding; row 3 has nothing to score
  mask[2, :7] = False                             # row 2 left-padded: real tokens 7..39
  tokens = np.where(mask, tokens, 0)
  # torch reference: float64 log-softmax, position t scored iff mask[t] and mask[t-1]
  torch_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.inference_mode():
    logits = torch_model(torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long),
                         position_ids=torch.as_tensor(positions, dtype=torch.long)).logits
  logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1].numpy()
  nll = -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
  scored = mask[:, 1:] & mask[:, :-1]
  assert scored.sum() == 39 + 24 + 32 + 0 + 32
  ref_nll = nll[scored].sum()
  for batch_size in (2, 8):  # 5 rows: padded last batch, and one padded batch
    out = metrics.gen_ppl(model, tokens, mask, batch_size=batch_size)
    assert out["tokens"] == 127
    np.testing.assert_allclose(out["nll_sum"], ref_nll, rtol=1e-5)
    np.testing.assert_allclose(out["gen_ppl"], math.exp(ref_nll / 127), rtol=1e-5)
    np.testing.assert_allclose(out["row_nll"], np.where(scored, nll, 0).sum(1), rtol=1e-5,
                               atol=1e-9)
    assert list(out["row_tokens"]) == list(scored.sum(1))
  full = metrics.gen_ppl(model, jnp.asarray(tokens[:1]))  # mask=None: every token real
  np.testing.assert_allclose(full["nll_sum"], nll[0].sum(), rtol=1e-5)
  tail = metrics.gen_ppl(model, tokens[:1], score_from=20)  # a continuation after 20 tokens
  assert tail["tokens"] == 20
  np.testing.assert_allclose(tail["nll_sum"], nll[0, 19:].sum(), rtol=1e-5)
  with pytest.raises(ValueError):
    metrics.gen_ppl(model, tokens[3:4], mask[3:4])


def test_spread_ratio():
  real = np.random.default_rng(4).standard_normal((4, 50, 16)) * np.linspace(0.1, 9, 16)
  np.testing.assert_allclose(metrics.spread_ratio(0.5 * real + 3.0, real), 0.5, rtol=1e-12)
  # exact population variances: real [1, 9] (mean 5), generated [4, 4] -> 2 / sqrt(5)
  real2 = np.array([[1.0, 3.0], [-1.0, -3.0]])
  gen2 = np.array([[2.0, 2.0], [-2.0, -2.0]])
  np.testing.assert_allclose(metrics.spread_ratio(gen2, real2), 2 / math.sqrt(5), rtol=1e-12)
  with pytest.raises(ValueError):
    metrics.spread_ratio(real[..., :8], real)


def test_token_accuracy():
  pred = np.array([[1, 2, 3], [4, 5, 6]])
  target = np.array([[1, 0, 3], [4, 5, 0]])
  assert metrics.token_accuracy(pred, target) == 4 / 6
  mask = np.array([[True, True, True], [True, False, False]])
  assert metrics.token_accuracy(pred, target, mask) == 3 / 4  # (0,0) (0,2) (1,0) of 4
  assert metrics.token_accuracy(pred, target, np.zeros_like(mask)) == 0.0
