"""`dihal ablate`'s entropy matching: the temperature bisection, the headline β and the winner
rule, checked against SciPy's entropy and closed cases; which bridge a tolerant row trains."""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from conftest import load_config
from dihal_jax import defaults
from dihal_jax.eval import ablation, entropy_match

VOCAB = 400
LOGITS = -1.5 * np.log(np.arange(1, VOCAB + 1))  # a Zipf law: entropy rises with T


def quantile_read(t: float) -> np.ndarray:
  """Tokens whose counts follow softmax(LOGITS / t) (inverse CDF at evenly spaced quantiles):
  a draw without sampling noise, 64 rows of 65 positions (position 0 = a separator)."""
  cdf = np.cumsum(scipy.special.softmax(LOGITS / t))
  tokens = np.searchsorted(cdf, (np.arange(64 * 64) + 0.5) / (64 * 64)).reshape(64, 64)
  return np.concatenate([np.full((64, 1), VOCAB), tokens], axis=1)


def scipy_entropy(tokens: np.ndarray) -> float:
  return float(scipy.stats.entropy(np.unique(tokens[:, 1:], return_counts=True)[1]))


@pytest.mark.parametrize("target", [2.0, 3.5, 5.0])
def test_the_bisection_finds_a_temperature_within_the_tolerance(target):
  t, tokens, matched = entropy_match.matched_temperature(quantile_read, target)
  assert matched
  assert abs(scipy_entropy(tokens) - target) <= entropy_match.ENTROPY_TOL
  np.testing.assert_array_equal(tokens, quantile_read(t))
  assert entropy_match.T_RANGE[0] <= t <= entropy_match.T_RANGE[1]


def test_an_unreachable_entropy_is_reported_unmatched_at_the_closest_end():
  # log(400) = 5.99 nats is the most 400 tokens can carry: 6.5 cannot be reached.
  t, tokens, matched = entropy_match.matched_temperature(quantile_read, 6.5)
  assert not matched
  assert t > 0.9 * entropy_match.T_RANGE[1]  # the bisection ran to the top of its bracket
  assert scipy_entropy(tokens) == pytest.approx(scipy_entropy(quantile_read(t)))


def _reads(matched: dict[float, bool]) -> dict:
  return {ablation.beta_key(b): {"entropy_matched": ok} for b, ok in matched.items()}


def test_the_headline_beta_is_the_largest_at_which_every_read_matched():
  ladder = [1.0, 0.3, 0.1]
  oracle = _reads({1.0: True, 0.3: True, 0.1: True})
  rows = {"a": {"reads": _reads({1.0: False, 0.3: True, 0.1: True})},
          "b": {"reads": _reads({1.0: True, 0.3: True, 0.1: True})}}
  assert ablation.headline_beta(rows, oracle, ladder) == (0.3, True)
  rows["a"]["reads"] = _reads({1.0: True, 0.3: False, 0.1: True})
  assert ablation.headline_beta(rows, oracle, ladder) == (1.0, True)
  # No β matches everything: the most matched reads, the larger β on a tie.
  rows = {"a": {"reads": _reads({1.0: False, 0.3: True, 0.1: True})},
          "b": {"reads": _reads({1.0: False, 0.3: False, 0.1: True})}}
  oracle = _reads({1.0: True, 0.3: True, 0.1: False})
  assert ablation.headline_beta(rows, oracle, ladder) == (0.3, False)
  rows["b"]["reads"] = _reads({1.0: True, 0.3: False, 0.1: True})
  assert ablation.headline_beta(rows, oracle, ladder) == (1.0, False)


def test_the_ladder_holds_the_untuned_beta_and_runs_largest_first():
  config = defaults.base()
  config.ablate.betas = (0.1, 1.0)
  config.sample.beta = 0.5
  assert ablation.betas(config) == [1.0, 0.5, 0.1]


def test_the_winner_is_the_lowest_ngram_among_rows_near_real_entropy():
  rows = {"low_entropy": {"entropy": 4.0, "ngram_ppl": 100.0, "ngram_ppl_ci": (90, 110)},
          "matched": {"entropy": 5.9, "ngram_ppl": 300.0, "ngram_ppl_ci": (280, 320)},
          "unet_scratch": {"entropy": 5.8, "ngram_ppl": 400.0, "ngram_ppl_ci": (315, 450)}}
  assert ablation._winner(rows, 5.9) == "matched"
  real = {"ngram_ppl": 100.0, "gen_ppl": 50.0}
  rows["matched"]["gen_ppl"] = 200.0
  verdict = ablation._verdict(rows, "matched", real)
  assert verdict["beats_unet_outside_ci"] is False  # 320 > 315: the intervals overlap
  assert verdict["ngram_vs_real"] == 3.0 and verdict["gen_ppl_vs_real"] == 4.0
  # No row near real text's entropy: no winner, however low its perplexity.
  assert ablation._winner({"low_entropy": rows["low_entropy"]}, 5.9) is None
  assert ablation._verdict(rows, None, real) is None


def test_a_tolerant_row_trains_its_decoder_on_its_twins_bridge(monkeypatch, tmp_path):
  bridges, decoders = [], []

  def train(config, workdir, progress=True):
    bridges.append((workdir.name, config.bridge.denoiser, config.tolerant.enabled))
    return {"interrupted": False}

  def decoder(config, workdir, *, decoder_workdir, progress=True):
    decoders.append((workdir.name, decoder_workdir.name, config.tolerant.enabled))
    return {"val_nll": {}}

  monkeypatch.setattr(ablation, "run_train", train)
  monkeypatch.setattr(ablation, "train_tolerant_decoder", decoder)
  chosen = {name: ablation.ROWS[name]
            for name in ("transformer_backbone_tolerant", "unet_scratch")}
  _, nll = ablation.train_rows(load_config("tiny_llama"), tmp_path, chosen, layer=1,
                               progress=False)
  # no bridge of the tolerant row's own: its twin's (with tolerant off), then the decoder
  assert bridges == [("transformer_backbone", "transformer", False),
                     ("unet_scratch", "unet", False)]
  assert decoders == [("transformer_backbone", "transformer_backbone_tolerant", True)]
  assert list(nll) == ["transformer_backbone_tolerant"]
