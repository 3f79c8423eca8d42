"""Masked diffusion post-trained from the backbone (dihal_jax/mdm): objective, attention,
sampler, data-parallel step; references are hand computations, NumPy and transformers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dihal_jax.bridge.train_step import init_train_state, make_optimizer
from dihal_jax.errors import UserInputError
from dihal_jax.mdm import attention, objective, sampler
from dihal_jax.mdm import train as mdm_train
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh


def test_loss_equals_the_hand_computed_nelbo():
  # One window of T = 3 over V = 2: position 0 the separator, positions 1 and 2 masked,
  # t = 0.5. Unshifted: logits at i predict token i.
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]]])
  tokens = jnp.array([[0, 0, 0]])
  masked = jnp.array([[False, True, True]])
  # p(0 | pos 1) = 3/4, p(0 | pos 2) = 1/5: (1/t) * (-log 3/4 - log 1/5) / (T - 1).
  expected = (1 / 0.5) * (-math.log(3 / 4) - math.log(1 / 5)) / 2
  got = objective.mdlm_loss(objective.token_logits(logits, False), tokens, masked,
                           jnp.array([0.5]))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # Shifted: position 1 is predicted by logits[0] (p(0) = 1/2), position 2 by logits[1]
  # (p(0) = 3/4).
  expected_shift = (1 / 0.5) * (-math.log(1 / 2) - math.log(3 / 4)) / 2
  got = objective.mdlm_loss(objective.token_logits(logits, True), tokens, masked,
                           jnp.array([0.5]))
  np.testing.assert_allclose(float(got), expected_shift, rtol=1e-6)


def test_unmasked_positions_do_not_count_and_batch_is_averaged():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 7, (2, 5)))
  masked = jnp.array([[False, True, False, True, True], [False, False, True, False, False]])
  t = jnp.array([0.8, 0.2])
  x = np.asarray(logits, np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
  want = np.mean((nll * np.asarray(masked)).sum(1) / np.asarray(t) / 4)
  got = objective.mdlm_loss(logits, tokens, masked, t)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mask_tokens_never_masks_the_separator_and_follows_t():
  tokens = jnp.ones((4, 4000), jnp.int32)
  z, masked = objective.mask_tokens(jax.random.key(0), tokens, jnp.array([0.0, 0.25, 0.9, 1.0]),
                                    mask_id=7)
  m = np.asarray(masked)
  assert not m[:, 0].any()
  np.testing.assert_array_equal(np.asarray(z) == 7, m)
  np.testing.assert_allclose(m[:, 1:].mean(1), [0.0, 0.25, 0.9, 1.0], atol=0.02)


def test_annealed_pattern_goes_from_causal_to_bidirectional():
  causal = np.tril(np.ones((16, 16), bool))
  p0 = np.asarray(attention.annealed_pattern(jax.random.key(0), 3, 16, 0.0))
  p1 = np.asarray(attention.annealed_pattern(jax.random.key(0), 3, 16, 1.0))
  half = np.asarray(attention.annealed_pattern(jax.random.key(1), 64, 16, 0.5))
  np.testing.assert_array_equal(p0, np.broadcast_to(causal, p0.shape))
  assert p1.all()
  assert half[:, causal].all()  # the causal past is always seen
  np.testing.assert_allclose(half[:, ~causal].mean(), 0.5, atol=0.02)
  assert float(attention.anneal_rate(5, 10)) == 0.5 and float(attention.anneal_rate(50, 10)) == 1
  assert float(attention.anneal_rate(0, 0)) == 1.0


def test_causal_pattern_at_rate_0_is_the_backbone_and_bidirectional_matches_torch(models):
  """r = 0 and nothing masked (t -> 0): the MDM forward is the AR forward (transformers'
  logits); the bidirectional pattern matches transformers given an all-True 4-D mask."""
  model, ref = models
  tokens = np.random.default_rng(0).integers(3, 300, (2, 12))
  pattern = attention.annealed_pattern(jax.random.key(0), 2, 12, 0.0)
  with torch.no_grad():
    causal = ref(torch.tensor(tokens)).logits.numpy()
    bidir = ref(torch.tensor(tokens),
                attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens), attention=pattern)), causal,
                             atol=2e-5)
  got = np.asarray(model(jnp.asarray(tokens), attention=attention.bidirectional(12)))
  np.testing.assert_allclose(got, bidir, atol=2e-5)
  assert np.abs(bidir - causal).max() > 0.1  # the patterns really differ


class _Oracle(nnx.Module):
  """A perfect denoiser stand-in: logits that put all mass on the target's tokens (at i - 1
  with the shift)."""

  def __init__(self, target: np.ndarray, vocab: int, shift: bool):
    one_hot = np.where(np.eye(vocab)[target] > 0, 0.0, -1e4).astype(np.float32)
    if shift:
      one_hot = np.concatenate([one_hot[:, 1:], one_hot[:, :1]], axis=1)
    self.logits = nnx.Variable(jnp.asarray(one_hot))

  def __call__(self, tokens, *, attention=None):
    del attention
    return self.logits[...][:tokens.shape[0]]


@pytest.mark.parametrize("unmask,block,shift", [("confidence", 0, True), ("random", 0, False),
                                                 ("confidence", 4, True), ("random", 8, True)])
def test_sampler_with_a_perfect_denoiser_reproduces_the_sequence(unmask, block, shift):
  rng = np.random.default_rng(0)
  target = rng.integers(1, 20, (3, 16)).astype(np.int32)
  target[:, 0] = 0
  known = np.zeros((3, 16), bool)
  known[:, 0] = True
  known[1, :5] = True  # a prompt
  known[2, 9:12] = True  # text around an infill gap
  given = np.where(known, target, 0)
  out = sampler.sample(_Oracle(target, 21, shift), given, known, jax.random.key(0), mask_id=20,
                       shift=shift, steps=5, unmask=unmask, block=block)
  np.testing.assert_array_equal(out, target)


def test_reveal_counts_follow_the_linear_schedule():
  counts = sampler.reveal_counts(np.array([63, 10, 0]), 4)
  np.testing.assert_array_equal(counts.sum(0), [63, 10, 0])
  # remaining after s steps = round(M (1 - s/4)): 63 -> 47, 32, 16, 0.
  np.testing.assert_array_equal(counts[:, 0], [63 - 47, 47 - 32, 32 - 16, 16])
  np.testing.assert_array_equal(counts[:, 1], [10 - 8, 8 - 5, 5 - 2, 2])


def test_confidence_order_reveals_the_most_confident_position_first():
  """One step revealing one of two masked positions: the one whose logits are peaked."""
  target = np.array([[0, 5, 6]], np.int32)
  peaked = np.full((1, 3, 8), -1e4, np.float32)
  peaked[0, 1, 5] = 0.0  # position 1: certain
  peaked[0, 2, :] = 0.0  # position 2: uniform

  class Fixed(nnx.Module):
    def __init__(self):
      self.logits = nnx.Variable(jnp.asarray(peaked))

    def __call__(self, tokens, *, attention=None):
      return self.logits[...]

  graphdef, state = nnx.split(Fixed())
  tokens, masked = sampler._step(graphdef, state, jnp.array([[0, 7, 7]]),
                                 jnp.array([[False, True, True]]), jnp.array([1]),
                                 jax.random.key(0), mask_id=7, shift=False, trained_block=0,
                                 unmask="confidence", temperature=1.0, top_p=1.0)
  np.testing.assert_array_equal(np.asarray(tokens), [[0, 5, 7]])
  np.testing.assert_array_equal(np.asarray(masked), [[False, False, True]])
  del target


@pytest.mark.slow
def test_one_device_step_equals_the_eight_device_step(models):
  model, _ = models
  tokens = np.random.default_rng(1).integers(3, 300, (8, 16)).astype(np.int32)
  tokens[:, 0] = 0
  optim = mdm_train.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=4)
  results = []
  for mesh in (make_mesh({"data": 1}), make_mesh({"data": 8})):
    graphdef, weights = nnx.split(model)  # a copy: the step donates its state
    copy = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), weights))
    state = init_train_state(copy, make_optimizer(optim))
    step = mdm_train.make_train_step(mesh, DEFAULT_RULES, optim, mask_id=299, shift=True,
                                     anneal_steps=2)
    losses = []
    for _ in range(3):
      state, metrics = step(state, tokens, jax.random.key(0))
      losses.append(float(metrics["loss"]))
    results.append((losses, np.asarray(jax.tree.leaves(state.params)[0])))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-5)
  assert results[0][0][0] != results[0][0][2]  # the steps really trained


class _Tokenizer:
  def __init__(self, mask=None, added=(), special=(0, 1), size=100):
    self.mask_token_id, self.all_special_ids, self.size = mask, list(special), size
    self.added_tokens_decoder = {i: type("T", (), {"special": s})() for i, s in added}

  def __len__(self):
    return self.size


def test_mask_id_resolution_and_bad_ids():
  assert mdm_train.mask_token_id(-1, _Tokenizer(mask=42), 128, 0) == 42
  assert mdm_train.mask_token_id(-1, _Tokenizer(added=[(0, True), (5, True), (9, True),
                                                       (11, False)]), 128, 0) == 9
  assert mdm_train.mask_token_id(-1, _Tokenizer(), 128, 0) == 100  # first spare row
  assert mdm_train.mask_token_id(17, _Tokenizer(), 128, 0) == 17
  for bad in (128, -2, 0):
    with pytest.raises(UserInputError, match="mdm.mask_id"):
      mdm_train.mask_token_id(bad, _Tokenizer(), 128, 0)
  with pytest.raises(UserInputError, match="no spare"):
    mdm_train.mask_token_id(-1, _Tokenizer(size=128), 128, 0)


def test_sampler_settings_are_checked():
  with pytest.raises(UserInputError, match="mdm_block=5"):
    sampler.check(10, "confidence", 5, 64)
  with pytest.raises(UserInputError, match="unmask"):
    sampler.check(10, "entropy", 0, 64)
  sampler.check(10, "random", 16, 64)


@pytest.mark.parametrize("length,block", [(6, 2), (6, 3), (4, 1)])
def test_block_diffusion_pattern_is_bd3lms_three_masks(length, block):
  """x_t ⊕ x_0: block-diagonal among noisy keys, offset block-causal from noisy to clean,
  block-causal among clean keys, never clean to noisy (BD3-LM's M_BD | M_OBC | M_BC)."""
  got = np.asarray(attention.block_diffusion(length, block))
  want = np.zeros((2 * length, 2 * length), bool)
  for q in range(2 * length):
    for k in range(2 * length):
      bq, bk = (q % length) // block, (k % length) // block
      if q < length and k < length:
        want[q, k] = bq == bk
      elif q < length:
        want[q, k] = bk < bq
      elif k >= length:
        want[q, k] = bk <= bq
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(attention.block_positions(length))[0],
                                list(range(length)) * 2)


def test_one_block_without_the_shift_is_the_bidirectional_mdm(models):
  """With a single block the noisy half sees exactly the noised window: the plain MDLM pass."""
  model, _ = models
  rng = np.random.default_rng(1)
  clean = jnp.asarray(rng.integers(3, 300, (2, 8)))
  z = jnp.where(jnp.asarray(rng.random((2, 8)) < 0.5), 5, clean)
  got = objective.predictions(model, z, clean, shift=False, block=8)
  want = model(z, attention=attention.bidirectional(8))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_blocks_of_one_with_the_shift_are_the_ar_model(models):
  """Blocks of 1 with the shift: every token is a block's first, read at the clean half's
  i - 1, which sees x_<i: transformers' causal next-token logits, whatever z holds."""
  model, ref = models
  rng = np.random.default_rng(2)
  tokens = rng.integers(3, 300, (2, 10))
  z = jnp.full((2, 10), 5)
  got = np.asarray(objective.predictions(model, z, jnp.asarray(tokens), shift=True, block=1))
  with torch.no_grad():
    causal = ref(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got[:, 1:], causal[:, :-1], atol=2e-5)


def test_sampling_a_blocks_of_one_model_greedily_is_greedy_ar_decoding(models):
  model, ref = models
  n = 8
  given = np.zeros((2, n), np.int32)
  given[:, :3] = [[1, 40, 41], [1, 90, 17]]
  known = np.arange(n)[None].repeat(2, 0) < 3
  out = sampler.sample(model, given, known, jax.random.key(0), mask_id=5, shift=True, steps=1,
                       trained_block=1, temperature=0.0)
  ids = torch.tensor(given[:, :3], dtype=torch.long)
  with torch.no_grad():
    for _ in range(n - 3):
      nxt = ref(ids).logits[:, -1].argmax(-1, keepdim=True)
      ids = torch.cat([ids, nxt], dim=1)
  np.testing.assert_array_equal(out, ids.numpy())
