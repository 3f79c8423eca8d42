"""DiHAL's labelled bridge for attribute control (dglm/bridge_guidance.py): the label
encoding of partial attribute assignments, independent per-attribute dropout (SciPy
binomial tests), the leading-separator padding that keeps the known states independent of
the continuation, and guided sampling equal to the classifier-free combination composed
by hand."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from dihal_jax.bridge import diffusion
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.unet import UNet, UNetConfig
from dihal_jax.dglm.bridge_guidance import UNSPECIFIED, Labels, padded
from dihal_jax.hybrid.bridge_sampler import TrainedBridge

VALUES = {"book": ("austen", "moby_dick", "emma"), "speech": ("narration", "dialogue")}


def test_label_ids_enumerate_every_partial_assignment_once():
  labels = Labels(VALUES)
  assert labels.count == 4 * 3 - 1
  grid = list(itertools.product(range(-1, 3), range(-1, 2)))
  ids = labels.ids({"book": np.array([b for b, _ in grid]),
                    "speech": np.array([s for _, s in grid])})
  assert sorted(ids.tolist()) == list(range(-1, labels.count))
  assert ids[grid.index((UNSPECIFIED, UNSPECIFIED))] == diffusion.NULL_LABEL
  # an attribute left out is unspecified; a target names only its attributes
  book_only = labels.ids({"book": np.array([1])})
  assert book_only[0] == ids[grid.index((1, UNSPECIFIED))]
  np.testing.assert_array_equal(labels.of_target((("book", 1), ("speech", 0)), 3),
                                np.full(3, ids[grid.index((1, 0))]))


def test_dropout_drops_each_attribute_independently_at_the_rate():
  labels = Labels(VALUES)
  n, rate = 40_000, 0.3
  rng = np.random.default_rng(0)
  y = {"book": rng.integers(0, 3, n), "speech": rng.integers(0, 2, n)}
  out = labels.dropped(y, np.random.default_rng(1), rate)
  gone = {a: out[a] == UNSPECIFIED for a in y}
  for a in y:
    assert scipy.stats.binomtest(int(gone[a].sum()), n, rate).pvalue > 1e-4
    np.testing.assert_array_equal(out[a][~gone[a]], y[a][~gone[a]])
  both = int((gone["book"] & gone["speech"]).sum())
  assert scipy.stats.binomtest(both, n, rate * rate).pvalue > 1e-4
  assert all(np.array_equal(labels.dropped(y, rng, 0.0)[a], y[a]) for a in y)


def test_padding_leads_with_separators_so_known_states_ignore_the_continuation(models):
  model, _ = models
  sep, prefix = 2, 9
  rng = np.random.default_rng(0)
  a = rng.integers(3, 300, (2, 33)).astype(np.int32)
  b = a.copy()
  b[:, prefix:] = rng.integers(3, 300, (2, 33 - prefix))  # another continuation
  pa, pb = padded(a, 4, sep), padded(b, 4, sep)
  assert pa.shape == (2, 36)
  np.testing.assert_array_equal(pa[:, :3], sep)
  np.testing.assert_array_equal(pa[:, 3:], a)
  assert padded(pa, 4, sep).shape == pa.shape  # already a multiple: unchanged
  known = 3 + prefix
  ha = np.asarray(model.hidden_states(jnp.asarray(pa), [1])[1])
  hb = np.asarray(model.hidden_states(jnp.asarray(pb), [1])[1])
  np.testing.assert_allclose(ha[:, :known], hb[:, :known], rtol=0, atol=1e-6)
  assert not np.allclose(ha[:, known:], hb[:, known:])


@pytest.fixture(scope="module")
def labelled_bridge():
  """A small labelled UNet with its weights perturbed (every layer active), as a bridge."""
  dim, classes = 6, 3
  model = UNet(dim, UNetConfig(channels=8, channel_mults=(1, 2), blocks_per_level=1,
                               attention_levels=(), heads=2, groups=4, num_classes=classes),
               rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  norm = Normalizer("per_channel", np.zeros(dim, np.float32), np.ones(dim, np.float32))
  return TrainedBridge(graphdef=graphdef, params=(params, rest), norm=norm, layer=1, dim=dim,
                       diffusion=diffusion.DiffusionConfig(steps=6), self_condition=False,
                       step=0, train_cache=None, factor=2, kind="unet", params_count=0)


def test_conditioned_sampling_is_the_guided_combination(labelled_bridge):
  bridge = labelled_bridge
  b, n, w = 4, 8, 2.5
  key = jax.random.key(3)
  known_h = jax.random.normal(jax.random.key(4), (b, n, bridge.dim))
  known_mask = jnp.broadcast_to(jnp.arange(n) < 3, (b, n))
  labels = jnp.array([0, 1, 2, -1])
  model = nnx.merge(bridge.graphdef, *bridge.params)
  mask = known_mask[..., None]
  clean = jnp.where(mask, known_h, 0.0)

  def combined(x_t, t, known_mask_, labels_):  # (1 + w)·cond - w·uncond, composed here
    x = jnp.where(mask, known_h, x_t)
    cond = model(x, t, known_mask, clean, labels)
    uncond = model(x, t, known_mask, clean, jnp.full_like(labels, -1))
    return (1 + w) * cond - w * uncond

  want = diffusion.sample(combined, key, known_h.shape, bridge.diffusion, known=known_h,
                          known_mask=known_mask)
  got = bridge.conditioned(labels, w).sample(key, known_h, known_mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  plain = bridge.sample(key, known_h, known_mask)
  other = bridge.conditioned(jnp.array([1, 2, 0, 0]), w).sample(key, known_h, known_mask)
  assert not np.allclose(np.asarray(got)[:3], np.asarray(plain)[:3], atol=1e-3)
  assert not np.allclose(np.asarray(got)[:3], np.asarray(other)[:3], atol=1e-3)
  # the null-label row is unconditional whatever w is
  np.testing.assert_allclose(np.asarray(got)[3], np.asarray(plain)[3], rtol=1e-4, atol=1e-4)
