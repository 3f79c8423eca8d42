"""The table of `dihal eval`'s generated rows: every entry can be sampled, on its own stream."""

import pytest

from dihal_jax.eval.evaluate import METHODS, MODEL_LOADERS
from dihal_jax.eval.rows import BRIDGES, ROWS
from dihal_jax.hybrid.readout import MODES


def test_every_readout_mode_has_a_bridge_row():
  assert {f"dihal_{mode}" for mode in MODES} <= set(ROWS)
  for mode in MODES:
    assert ROWS[f"dihal_{mode}"].mode == mode


def test_rows_have_distinct_random_streams():
  streams = [row.stream for row in ROWS.values()]
  assert len(set(streams)) == len(streams)


def test_every_sampled_model_has_a_loader():
  models = {row.model for row in ROWS.values()} - {None}
  assert models <= set(MODEL_LOADERS) and set(BRIDGES) <= set(MODEL_LOADERS)


def test_methods_are_the_window_rows_then_the_table():
  assert METHODS[:3] == ("real_text", "oracle", "oracle_lm_head")
  assert METHODS[3:] == tuple(ROWS)


@pytest.mark.parametrize("fit", [128, 8])
def test_a_joint_row_at_matched_entropy_reads_the_states_the_plain_row_reads(models, monkeypatch,
                                                                              fit):
  """eval.match_entropy: the unigram entropy (SciPy) of the windows T is bisected on (all 12,
  or the first 8 of 12 in batches of 4) lands within the tolerance of as many real windows',
  and every token is the plain joint row's at the temperature it found (the same states, the
  same keys)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import scipy.stats

  from dihal_jax.bridge.normalization import Normalizer
  from dihal_jax.bridge.token_head import ClassMeanHead
  from dihal_jax.eval import entropy_match
  from dihal_jax.eval.rows import RowGenerators
  from dihal_jax.hybrid.readout import Readout, ReadoutConfig

  monkeypatch.setattr(entropy_match, "FIT_WINDOWS", fit)
  model, _ = models
  sep, n, num, d = 1, 16, 12, model.cfg.hidden_size
  rng = np.random.default_rng(0)
  train = rng.integers(0, model.cfg.vocab_size, (8, n)).astype(np.int32)
  reader = Readout(model, 1, sep)
  norm = Normalizer("per_channel", np.zeros(d, np.float32), np.ones(d, np.float32))
  head = ClassMeanHead.fit(train, np.asarray(reader.lower(train)), norm,
                           vocab_size=model.cfg.vocab_size)

  class MeanBridge:  # known positions kept, the rest one state (draws differ by T alone)
    def sample(self, key, known_h, known, *, steps=None):
      return jnp.where(known[..., None], known_h, 0.0)

  def entropy(tokens):  # of the windows T is bisected on
    return scipy.stats.entropy(np.bincount(tokens[:fit, 1:].ravel()))

  def gens(reference, temperature=1.0):
    return RowGenerators(model, None, ReadoutConfig(temperature=temperature, beta=1.0),
                         "joint", 4, bridges={"main": MeanBridge()},
                         readers={"main": reader}, heads={"main": head},
                         entropy_reference=reference)

  given = np.full((num, n), sep, np.int32)
  key = jax.random.key(3)
  low = entropy(gens(None, 0.2)("dihal", key, given, 1)[0])
  high = entropy(gens(None, 3.0)("dihal", key, given, 1)[0])
  assert high - low > 1.0  # the temperature moves the entropy
  # real text whose entropy lies between the two: tokens drawn from a steep Zipf law
  zipf = 1.0 / np.arange(1, 61) ** 2.5
  real = rng.choice(60, size=(num, n), p=zipf / zipf.sum()).astype(np.int32)
  target = entropy(real)
  assert low + 0.3 < target < high - 0.3, (low, target, high)
  g = gens(real)
  tokens, states = g("dihal", key, given, 1)
  assert g.matched_read["entropy_matched"]
  assert abs(entropy(tokens) - target) <= entropy_match.ENTROPY_TOL
  plain = gens(None, g.matched_read["temperature"])
  want, want_states = plain("dihal", key, given, 1)
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(states, want_states)
  assert plain.matched_read is None
  # a row read another way is never matched
  g("dihal_identity", key, given, 1)
  assert g.matched_read is None


def test_each_bridge_row_is_read_with_its_own_bridges_current_token_head(models):
  """`dihal_l0` read by `identity` uses the l = 0 bridge's head (class means of embeddings),
  `dihal_identity` the l* bridge's: NumPy nearest class mean of the states each sampled."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dihal_jax.bridge.normalization import Normalizer
  from dihal_jax.bridge.token_head import ClassMeanHead
  from dihal_jax.eval.rows import RowGenerators
  from dihal_jax.hybrid.readout import Readout, ReadoutConfig

  model, _ = models
  sep, n, d = 1, 16, model.cfg.hidden_size
  train = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (8, n)).astype(np.int32)
  norm = Normalizer("per_channel", np.zeros(d, np.float32), np.ones(d, np.float32))
  readers = {"main": Readout(model, 1, sep), "l0": Readout(model, 0, sep)}
  heads = {m: ClassMeanHead.fit(train, np.asarray(r.lower(train)), norm,
                                vocab_size=model.cfg.vocab_size) for m, r in readers.items()}

  class NoiseBridge:
    def sample(self, key, known_h, known, *, steps=None):
      return jnp.where(known[..., None], known_h, jax.random.normal(key, known_h.shape))

  g = RowGenerators(model, None, ReadoutConfig(), "identity", 4,
                    bridges={"main": NoiseBridge(), "l0": NoiseBridge()}, readers=readers,
                    heads=heads)
  given = np.full((6, n), sep, np.int32)
  for method, model_name in (("dihal_l0", "l0"), ("dihal_identity", "main")):
    tokens, states = g(method, jax.random.key(0), given, 1)
    head = heads[model_name]
    z = np.asarray(states, np.float64)[:, 1:]
    dist = ((z[:, :, None, :] - head.means.astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(tokens[:, 1:], head.ids[dist.argmin(-1)])
