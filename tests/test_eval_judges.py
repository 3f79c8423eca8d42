"""The independent judges of `dihal eval`, each pinned to an independent reference.

- Kneser–Ney n-gram LM: a hand-worked bigram corpus, nltk's KneserNeyInterpolated
  (same padding, same discount, nltk's unigram level = D_1 = 0), and normalisation
  (Σ_w P(w | h) = 1 over the whole vocabulary, for seen and unseen contexts).
- Bootstrap intervals: scipy.stats.bootstrap with a naive per-resample statistic (same
  seed), and the closed-form normal interval of a mean.
- MAUVE (mauve-text): identical sets ≈ 1, disjoint sets ≈ 0.
- Sentence encoder: sentence-transformers' own encode() of the same model files.
- Calibration samplers: empirical frequencies against the counts they were fit on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats

from dihal_jax.eval import bootstrap, metrics
from dihal_jax.eval.calibration import CountSampler
from dihal_jax.eval.mauve_score import mauve
from dihal_jax.eval.ngram import KneserNey


# --- Kneser–Ney ---------------------------------------------------------------------------

def test_kneser_ney_bigram_by_hand():
  # Rows (n = 2: no padding): "0 1 2 1" and "0 2 1". V = 3, V' = 4 (pad id 3), D = 0.5.
  # Bigrams with counts: (0,1) 1, (1,2) 1, (2,1) 2, (0,2) 1.
  # Unigram continuation counts N1+(• w): w=1: {0,2} -> 2; w=2: {1,0} -> 2; w=0: 0.
  #   A_1 = 4, T_1 = 2, P_1(w) = max(cc - .5, 0)/4 + .5*2/4 * 1/4:
  #   P_1(1) = P_1(2) = 1.5/4 + 1/16 = 0.4375; P_1(0) = P_1(pad) = 1/16.
  # Context 2: followers {1: 2}, A = 2, T = 1: P(1|2) = 1.5/2 + .5*1/2*P_1(1) = 0.859375.
  # Context 0: followers {1: 1, 2: 1}, A = 2, T = 2: P(2|0) = .5/2 + .5*2/2*0.4375 = 0.46875.
  model = KneserNey.fit([[0, 1, 2, 1], [0, 2, 1]], vocab_size=3, order=2, discount=0.5)
  lp = model.token_logprobs([[2, 1], [0, 2], [1, 0]])
  assert np.exp(lp[0][0]) == pytest.approx(0.859375, abs=1e-12)
  assert np.exp(lp[1][0]) == pytest.approx(0.46875, abs=1e-12)
  # Context 1: followers {2: 1}, A = 1, T = 1: P(0|1) = 0 + .5*1/1 * 1/16 = 1/32.
  assert np.exp(lp[2][0]) == pytest.approx(1 / 32, abs=1e-12)
  nll, count = model.nll([[2, 1], [0, 2]])
  assert list(count) == [1, 1]
  assert model.perplexity([[2, 1], [0, 2]]) == pytest.approx(
      math.exp(-(math.log(0.859375) + math.log(0.46875)) / 2))


def test_kneser_ney_matches_nltk():
  from nltk.lm import KneserNeyInterpolated
  from nltk.util import everygrams
  rng = np.random.default_rng(0)
  vocab, order, discount = 7, 3, 0.3
  rows = [rng.integers(0, vocab, size=rng.integers(3, 12)) for _ in range(25)]
  model = KneserNey.fit(rows, vocab, order=order, discount=(0.0, discount, discount))
  pad = str(vocab)
  padded = [[pad] * (order - 2) + [str(t) for t in r] for r in rows]
  reference = KneserNeyInterpolated(order, discount=discount)
  reference.fit([list(everygrams(s, max_len=order)) for s in padded],
                vocabulary_text=[w for s in padded for w in s])
  queries = [rng.integers(0, vocab, size=9) for _ in range(6)]
  checked = 0
  for row, logp in zip(queries, model.token_logprobs(queries)):
    s = [pad] * (order - 2) + [str(t) for t in row]
    for t in range(1, len(row)):
      i = t + order - 2
      want = reference.score(s[i], s[i - order + 1:i])
      if want > 0:  # nltk's unigram level gives unseen words 0; ours then gives them 0 too
        assert np.exp(logp[t - 1]) == pytest.approx(want, rel=1e-9)
        checked += 1
  assert checked > 30


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_sums_to_one(order):
  rng = np.random.default_rng(order)
  vocab = 11
  rows = [rng.integers(0, vocab - 2, size=rng.integers(4, 20)) for _ in range(40)]  # 9, 10 unseen
  model = KneserNey.fit(rows, vocab, order=order)  # Ney's discounts
  assert all(0 < d < 1 for d in model.discounts)
  for context in ([1, 2, 3], [0, 0, 0], [9, 10, 4], [5]):
    candidates = [np.array(context + [w]) for w in range(vocab + 1)]  # + the pad symbol
    total = sum(np.exp(lp[-1]) for lp in model.token_logprobs(candidates))
    assert total == pytest.approx(1.0, abs=1e-12)


def test_kneser_ney_unseen_and_out_of_range_tokens_are_finite():
  model = KneserNey.fit([[0, 1, 2, 3, 1, 2]], vocab_size=10, order=4)
  lp = model.token_logprobs([[0, 9, 9, 7, 1]])[0]
  assert np.all(np.isfinite(lp)) and np.all(lp < 0)
  assert np.all(np.isfinite(model.token_logprobs([[0, 123456]])[0]))  # unknown id: unseen
  nll, count = model.nll([[0, 1, 2, 3, 1]], score_from=3)
  assert count[0] == 2
  with pytest.raises(ValueError, match="0..9"):
    KneserNey.fit([[0, 10]], vocab_size=10)


def test_in_domain_text_beats_shuffled_text():
  rng = np.random.default_rng(0)
  words = rng.integers(0, 50, size=200)
  train = [np.concatenate([[0], words[i:i + 30]]) for i in range(0, 170, 3)]
  model = KneserNey.fit(train, vocab_size=50)
  held_out = [np.concatenate([[0], words[i:i + 30]]) for i in range(1, 170, 7)]
  shuffled = [np.concatenate([[0], rng.permutation(r[1:])]) for r in held_out]
  assert model.perplexity(held_out) < 0.5 * model.perplexity(shuffled)


# --- bootstrap ----------------------------------------------------------------------------

def test_perplexity_ci_matches_scipy_with_a_naive_statistic():
  rng = np.random.default_rng(1)
  nll, count = rng.gamma(2.0, 30.0, size=64), rng.integers(20, 64, size=64).astype(float)
  ours = bootstrap.perplexity_ci(nll, count, seed=3)
  ref = scipy.stats.bootstrap(
      (np.arange(64),), lambda i: math.exp(nll[i.astype(int)].sum() / count[i.astype(int)].sum()),
      vectorized=False, n_resamples=bootstrap.RESAMPLES, method="BCa",
      rng=np.random.default_rng(3)).confidence_interval
  assert ours == pytest.approx([ref.low, ref.high], rel=1e-10)
  estimate = math.exp(nll.sum() / count.sum())
  assert ours[0] < estimate < ours[1]


def test_perplexity_ci_of_a_mean_is_the_normal_interval():
  # One token per row: ln PPL is a mean of nll; BCa respects the exp transform, so the
  # interval is close to exp(mean ± 1.96 sd / sqrt(n)).
  rng = np.random.default_rng(2)
  nll = rng.normal(4.0, 1.0, size=2000)
  lo, hi = bootstrap.perplexity_ci(nll, np.ones_like(nll), seed=0)
  half = 1.959964 * nll.std(ddof=1) / math.sqrt(len(nll))
  assert math.log(lo) == pytest.approx(nll.mean() - half, abs=0.01)
  assert math.log(hi) == pytest.approx(nll.mean() + half, abs=0.01)


def test_perplexity_ci_of_identical_rows_is_a_point():
  assert bootstrap.perplexity_ci([6.0, 6.0, 6.0], [3, 3, 3]) == [math.exp(2.0)] * 2


def test_entropy_ci_is_centred_with_scipys_standard_error():
  rng = np.random.default_rng(3)
  p = 1.0 / np.arange(1, 2001)
  seqs = [rng.choice(2000, size=40, p=p / p.sum()) for _ in range(96)]
  lo, hi = bootstrap.entropy_ci(seqs, seed=5)
  estimate = metrics.unigram_entropy(seqs)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = scipy.stats.bootstrap(
        (np.arange(96),), lambda i: metrics.unigram_entropy([seqs[j] for j in i.astype(int)]),
        vectorized=False, n_resamples=bootstrap.RESAMPLES, method="percentile",
        rng=np.random.default_rng(5))
  half = 1.959964 * ref.standard_error
  assert (lo, hi) == pytest.approx((estimate - half, estimate + half), rel=1e-6)


# --- MAUVE and the encoder ----------------------------------------------------------------

@pytest.mark.slow
def test_mauve_identical_sets_near_one_disjoint_near_zero():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(300, 32))
  assert mauve(p, p.copy()) > 0.99
  assert mauve(p, rng.normal(size=(300, 32)) + 6.0) < 0.05
  assert mauve(p, rng.normal(size=(300, 32))) > 0.8  # another draw of the same distribution


@pytest.mark.slow
def test_encoder_matches_sentence_transformers(tmp_path):
  from sentence_transformers import SentenceTransformer
  from dihal_jax.eval.encoder import PACKAGE, SentenceEncoder
  encoder = SentenceEncoder(PACKAGE, tmp_path)
  texts = ["It is a truth universally acknowledged.", "The whale rose from the deep.",
           "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"]
  ours = encoder(texts, batch_size=2)
  ref = SentenceTransformer(str(encoder.path), device="cpu").encode(
      texts, normalize_embeddings=True)
  assert ours.shape == (3, 384)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert SentenceEncoder(PACKAGE, tmp_path).path == encoder.path  # extracted once, reused


def test_encoder_missing_or_corrupt_package_is_a_user_error(tmp_path, monkeypatch):
  from dihal_jax.errors import UserInputError
  from dihal_jax.eval.encoder import model_dir
  with pytest.raises(UserInputError, match="not installed"):
    model_dir("no_such_encoder_package", tmp_path)
  fake = tmp_path / "site" / "fake_encoder_pkg"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("")
  (fake / "model.zip").write_bytes(b"not a zip file")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  with pytest.raises(UserInputError, match="cannot read"):
    model_dir("fake_encoder_pkg", tmp_path / "cache")
  assert not (tmp_path / "cache" / "encoders" / "fake_encoder_pkg").exists()
  assert list((tmp_path / "cache" / "encoders").iterdir()) == []  # no temporary left


# --- calibration samplers ------------------------------------------------------------------

def test_calibration_samplers_follow_the_counts():
  windows = np.array([[0, 1, 2, 1, 3], [0, 2, 1, 2, 1]])
  sampler = CountSampler.fit(windows, vocab_size=5)
  rng = np.random.default_rng(0)
  n = 100_000
  after_1 = sampler.bigram_sample(rng, np.ones((n, 1), int), 2)[:, 1]
  np.testing.assert_allclose(np.bincount(after_1, minlength=5) / n, [0, 0, 2 / 3, 1 / 3, 0],
                             atol=0.01)
  after_3 = sampler.bigram_sample(rng, np.full((n, 1), 3), 2)[:, 1]  # never a predecessor
  np.testing.assert_allclose(np.bincount(after_3, minlength=5) / n, [0, 4 / 8, 3 / 8, 1 / 8, 0],
                             atol=0.01)
  uni = sampler.unigram_sample(rng, np.zeros((n, 1), int), 3)
  assert (uni[:, 0] == 0).all()
  np.testing.assert_allclose(np.bincount(uni[:, 1:].ravel(), minlength=5) / (2 * n),
                             [0, 4 / 8, 3 / 8, 1 / 8, 0], atol=0.01)
  long = sampler.bigram_sample(rng, np.zeros((50, 1), int), 12)
  pairs = set(zip(long[:, :-1].ravel().tolist(), long[:, 1:].ravel().tolist()))
  seen = set(zip(windows[:, :-1].ravel().tolist(), windows[:, 1:].ravel().tolist()))
  assert {p for p in pairs if p[0] != 3} <= seen


# --- `dihal eval` end to end: a user's folder, and bad settings -----------------------------

EVAL_CHEAP = ["--config=configs/tiny_llama.py", "--config.eval.methods=real_text,bigram_sampler",
              "--config.eval.num=4", "--config.data.ood_dir="]


def _eval(tmp_path, *extra, env=None):
  import os
  import subprocess
  import sys
  from conftest import REPO
  return subprocess.run(
      [sys.executable, "-m", "dihal_jax.cli", "eval", *EVAL_CHEAP,
       f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def _user_folder(path):
  rng = np.random.default_rng(0)
  words = ["the", "house", "was", "quiet", "and", "she", "walked", "to", "garden", "letter"]
  path.mkdir(parents=True)
  for book in ("one", "two"):
    chapters = [f"CHAPTER {c}\n" + " ".join(rng.choice(words, size=400)) + ".\n"
                for c in range(1, 11)]
    (path / f"{book}.txt").write_text("\n".join(chapters), encoding="utf-8")
  return path


@pytest.mark.slow
def test_eval_on_a_user_folder_fits_the_ngram_judge_on_its_train_split(tmp_path):
  import json
  folder = _user_folder(tmp_path / "corpus")
  proc = _eval(tmp_path, f"--config.data.dir={folder}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  from dihal_jax.data.dataset import Data
  from dihal_jax.defaults import load_config_file
  from conftest import REPO
  config = load_config_file(REPO / "configs" / "tiny_llama.py")
  with config.unlocked():
    config.data.dir, config.data.ood_dir = str(folder), ""
    config.data.cache_dir = str(tmp_path / "cache")
  train = Data.from_config(config, tmp_path / "run").statistics["train"]["windows"]
  assert report["judges"]["ngram"]["train_windows"] == train
  rows = report["results"]
  # The judge fit on this folder knows its ten-word vocabulary: held-out text of the same
  # folder scores low per token (a judge fit elsewhere would not).
  assert rows["real_text"]["ngram_ppl"] < 100
  assert rows["bigram_sampler"]["num_samples"] == 4
  assert set(report["continuation"]) == {"real_text", "bigram_sampler"}


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (("--config.eval.seeds=0",), "eval.seeds=0"),
    (("--config.eval.ngram_order=1",), "eval.ngram_order=1"),
    (("--config.eval.prefix=64",), "eval.prefix=64"),
    (("--config.eval.num=100000",), "eval.num=100000"),
    (("--config.eval.encoder=no_such_encoder_package",), "not installed"),
])
def test_eval_bad_settings_exit_2_with_one_line(tmp_path, extra, message):
  proc = _eval(tmp_path, *extra)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("dihal: error:") and message in last, last
  assert not (tmp_path / "run" / "report.json").exists()
  assert not (tmp_path / "run" / "report.md").exists()


@pytest.mark.slow
def test_eval_with_a_corrupt_encoder_package_exits_2(tmp_path):
  site = tmp_path / "site" / "broken_encoder"
  site.mkdir(parents=True)
  (site / "__init__.py").write_text("")
  (site / "model.zip").write_bytes(b"PK\x03\x04 truncated")
  proc = _eval(tmp_path, "--config.eval.encoder=broken_encoder",
               env={"PYTHONPATH": str(tmp_path / "site")})
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("dihal: error:") and "cannot read" in last, last
  assert not (tmp_path / "run" / "report.json").exists()
  assert not list((tmp_path / "cache" / "encoders").glob("*broken*"))


@pytest.mark.slow
def test_judges_score_rows_seeds_and_continuations(tiny_checkpoints, tmp_path):
  from dihal_jax.backbone.convert import load_model
  from dihal_jax.eval.encoder import PACKAGE
  from dihal_jax.eval.judges import Judges
  from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh
  model = load_model(tiny_checkpoints["tiny_llama"], mesh=make_mesh({"data": 1}),
                     rules=DEFAULT_RULES)
  rng = np.random.default_rng(0)
  train = rng.integers(3, 60, (40, 16)).astype(np.int32)
  train[:, 0] = 1

  class Ids:  # a tokenizer stand-in: MAUVE needs text, any injective decoding will do
    @staticmethod
    def decode(ids):
      return " ".join(f"t{i}" for i in ids)

  judges = Judges.build(model, Ids(), train, order=3, encoder=PACKAGE, cache=tmp_path, batch=4,
                        seed=0)
  rows = train[:12]
  reference = judges.features(train[20:32])
  out = judges.score(rows, reference=reference, seeds=3)
  assert out["num_samples"] == 12 and out["mauve_reference"] == 12
  assert len(out["seed_gen_ppl"]) == len(out["seed_ngram_ppl"]) == 3
  # Pooled = token-weighted combination of the three seeds' chunks (4 rows of 15 tokens each).
  assert math.log(out["ngram_ppl"]) == pytest.approx(np.mean(np.log(out["seed_ngram_ppl"])))
  assert math.log(out["gen_ppl"]) == pytest.approx(np.mean(np.log(out["seed_gen_ppl"])))
  assert out["ngram_ppl"] == pytest.approx(judges.ngram.perplexity(rows))
  tail = judges.score(rows, start=8)
  assert tail["ngram_ppl"] == pytest.approx(judges.ngram.perplexity(rows, score_from=8))
  assert tail["entropy"] == pytest.approx(metrics.unigram_entropy(rows[:, 8:]))
  assert "mauve" not in tail and "seed_gen_ppl" not in tail
