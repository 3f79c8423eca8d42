"""The bridge training step: schedule, clipping, masks, EMA, learning, data parallelism, determinism.

Speed on a small CPU: the UNet is built once (one jitted init) and every
training test goes through one of two module-level step functions (8-device
and 1-device meshes), so XLA compiles the training step only twice.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats
from flax import nnx

from dihal_jax.bridge.diffusion import DiffusionConfig
from dihal_jax.bridge import diffusion
from dihal_jax.bridge.train_step import (T_MIN, OptimConfig, TrainState, draw_corruption,
                                         ema_decay_at, init_train_state, learning_rate,
                                         lowered_flops, make_optimizer, make_train_step,
                                         sample_known_mask, train_step)
from dihal_jax.bridge.unet import UNet, UNetConfig
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

D, N, B = 24, 16, 8
CFG = UNetConfig(channels=16, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,),
                 heads=2, groups=4, dropout=0.1)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=3, total_steps=100, ema_decay=0.9)
DIFF = DiffusionConfig()
# One fixed random window repeated B times: a dataset the model can fit in a few steps.
X0 = np.tile(np.random.default_rng(0).normal(size=(1, N, D)), (B, 1, 1)).astype(np.float32)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def init_params():
  """(graphdef, state) of a seeded UNet: fresh models (copies) without re-running the init."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(D, CFG, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(UNet(D, CFG, rngs=nnx.Rngs(0))))()
  return graphdef, state


def _fresh(init_params) -> TrainState:
  graphdef, state = init_params
  model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state))
  return init_train_state(model, make_optimizer(OPTIM))


@pytest.fixture(scope="module")
def step8():
  return make_train_step(DIFF, OPTIM, make_mesh({"data": 8}), DEFAULT_RULES)


@pytest.fixture(scope="module")
def step1():
  return make_train_step(DIFF, OPTIM, make_mesh({"data": 1}), DEFAULT_RULES)


def _np_params(state: TrainState, ema: bool = False) -> list[np.ndarray]:
  return [np.asarray(p, np.float64) for p in jax.tree.leaves(state.ema if ema else state.params)]


def _run(step, state, steps):
  """(final state, losses, params after every step as float64 NumPy)."""
  losses, trajectory = [], []
  for _ in range(steps):
    state, metrics = step(state, X0, KEY)
    losses.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"]))
    trajectory.append(_np_params(state))
  return state, np.array(losses), trajectory


def test_learning_rate_is_warmup_cosine():
  cfg = OptimConfig(lr=2e-3, warmup_steps=10, total_steps=110)

  def closed_form(step):
    if step < cfg.warmup_steps:
      return cfg.lr * step / cfg.warmup_steps
    frac = min((step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps), 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

  for step in (0, 1, 5, 10, 35, 60, 109, 110, 500):
    assert learning_rate(cfg, step) == pytest.approx(closed_form(step), rel=1e-5, abs=1e-10)
  assert learning_rate(cfg, 60) == pytest.approx(cfg.lr / 2, rel=1e-5)


def test_optimizer_clips_then_adamw_with_decay_on_matrices_only():
  """Two updates against a float64 NumPy AdamW on clipped gradients."""
  cfg = OptimConfig(lr=0.1, warmup_steps=1, total_steps=10, weight_decay=0.5, clip_norm=1.0)
  opt = make_optimizer(cfg)
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  grads = [{"w": 1e6 * rng.normal(size=(3, 2)), "b": 1e6 * rng.normal(size=(2,))},   # clipped
           {"w": 1e-2 * rng.normal(size=(3, 2)), "b": 1e-2 * rng.normal(size=(2,))}]  # not
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  state = opt.init(p)
  ref = {k: v.copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  for i, g in enumerate(grads):
    norm = math.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    g = {k: v * min(1.0, cfg.clip_norm / norm) for k, v in g.items()}
    lr = learning_rate(cfg, i)
    for k in ref:
      mu[k] = cfg.b1 * mu[k] + (1 - cfg.b1) * g[k]
      nu[k] = cfg.b2 * nu[k] + (1 - cfg.b2) * g[k] ** 2
      adam = (mu[k] / (1 - cfg.b1 ** (i + 1))) / (np.sqrt(nu[k] / (1 - cfg.b2 ** (i + 1))) + 1e-8)
      decay = cfg.weight_decay * ref[k] if ref[k].ndim >= 2 else 0.0
      ref[k] = ref[k] - lr * (adam + decay)
    updates, state = opt.update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grads[i]),
                                state, p)
    p = optax.apply_updates(p, updates)
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
  # Without clipping, step 2 would barely move (ν dominated by the 1e12 squares).
  assert np.max(np.abs(np.asarray(p["b"]) - params["b"])) > 0.05


def test_sample_known_mask_frequencies_and_shapes():
  n, count, p_prefix, p_span = 16, 4000, 0.5, 0.25
  masks = np.asarray(sample_known_mask(jax.random.key(3), count, n, p_prefix=p_prefix,
                                       p_span=p_span))
  assert masks.shape == (count, n) and masks.dtype == bool
  assert masks[:, 0].all()
  kinds = {"only0": 0, "prefix": 0, "span": 0}
  for m in masks:
    rest = np.flatnonzero(m[1:]) + 1
    if rest.size == 0:
      kinds["only0"] += 1
      continue
    assert np.all(np.diff(rest) == 1), m  # contiguous
    kinds["prefix" if rest[0] == 1 else "span"] += 1
  # A length-1 prefix looks like "only 0"; a span starting at 1 looks like a prefix.
  expected = {"only0": (1 - p_prefix - p_span) + p_prefix / (n - 1),
              "prefix": p_prefix * (n - 2) / (n - 1) + p_span / (n - 1),
              "span": p_span * (n - 2) / (n - 1)}
  for k, p in expected.items():
    sd = math.sqrt(p * (1 - p) / count)
    assert abs(kinds[k] / count - p) < 4 * sd, (k, kinds[k] / count, p)
  # Prefix lengths uniform over 1..n-1: mean of known counts among prefix-like ≈ n/2 + ...
  lengths = masks.sum(1)
  assert lengths.max() == n and lengths.min() == 1


def test_lowered_flops_counts_a_matmul_as_2mkn():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  assert lowered_flops(jax.jit(jnp.matmul), a, b) == 2 * 64 * 32 * 16
  # Two matmuls chained: the counts add.
  c = jnp.ones((16, 8))
  assert lowered_flops(jax.jit(lambda a, b, c: a @ b @ c), a, b, c) == (
      2 * 64 * 32 * 16 + 2 * 64 * 16 * 8)


def test_the_train_step_knows_its_flops_after_its_first_call(init_params):
  step = make_train_step(DIFF, OPTIM, make_mesh({"data": 1}), DEFAULT_RULES)
  assert step.flops() is None
  step(_fresh(init_params), X0, KEY)
  # At least the forward's and the backward's matmuls: more than twice the UNet's forward.
  graphdef, params = init_params
  forward = lowered_flops(jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(
      x, t, jnp.zeros(x.shape[:2], bool), jnp.zeros_like(x))), params, X0, jnp.full((B,), 0.5))
  assert step.flops() > 2 * forward > 0


def test_training_times_follow_the_chosen_distribution():
  """t ~ U(T_MIN, 1) by default; logit(t) ~ N(mean, std) with logit_normal (KS tests)."""
  x0 = jnp.zeros((20_000, 2, 1))
  keys = jax.random.split(jax.random.key(3), 3)
  t = np.asarray(draw_corruption(keys, x0)[0], np.float64)
  assert scipy.stats.kstest(t, scipy.stats.uniform(T_MIN, 1 - T_MIN).cdf).pvalue > 1e-3
  t = np.asarray(draw_corruption(keys, x0, (0.5, 0.8))[0], np.float64)
  assert scipy.stats.kstest(scipy.special.logit(t), scipy.stats.norm(0.5, 0.8).cdf).pvalue > 1e-3
  # The same test rejects the other distribution (it can fail).
  assert scipy.stats.kstest(t, scipy.stats.uniform(T_MIN, 1 - T_MIN).cdf).pvalue < 1e-6
  assert float(draw_corruption(keys, x0, (-30.0, 0.1))[0].min()) == pytest.approx(T_MIN)


def test_the_train_step_draws_its_times_from_logit_normal(init_params):
  """The jitted step uses logit_normal: its loss from the same state and key differs when the
  times are pinned near 0 and near 1 (a tiny std)."""
  mesh = make_mesh({"data": 1})
  losses = {}
  for where, mean in (("low", -12.0), ("high", 12.0)):
    step = make_train_step(DIFF, OPTIM, mesh, DEFAULT_RULES, logit_normal=(mean, 1e-3))
    losses[where] = float(step(_fresh(init_params), X0, KEY)[1]["loss"])
  assert abs(losses["low"] - losses["high"]) > 1e-3 * max(losses.values()), losses


@pytest.mark.slow
def test_loss_decreases_and_ema_follows_recursion(init_params, step8):
  state = _fresh(init_params)
  ema = _np_params(state)  # EMA starts at the initial params
  state, losses, trajectory = _run(step8, state, 30)
  assert int(state.step) == 30
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
  for k, params in enumerate(trajectory):
    d = min(OPTIM.ema_decay, (1 + k) / (10 + k))  # warm-up: 0.1, 0.18, 0.25, ... then 0.9
    ema = [d * e + (1 - d) * p for e, p in zip(ema, params)]
  for got, want, last in zip(_np_params(state, ema=True), ema, trajectory[-1]):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # The EMA lags the params (the check above is not vacuous).
  assert max(np.max(np.abs(e - p)) for e, p in zip(ema, trajectory[-1])) > 1e-3


@pytest.mark.slow
def test_data_parallel_matches_single_device(init_params, step8, step1):
  s8, losses8, _ = _run(step8, _fresh(init_params), 3)
  s1, losses1, _ = _run(step1, _fresh(init_params), 3)
  assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
  assert len(jax.tree.leaves(s1.params)[0].sharding.device_set) == 1
  np.testing.assert_allclose(losses8, losses1, rtol=0, atol=1e-5)
  for a, b in zip(_np_params(s8), _np_params(s1)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  # The steps moved the params (not a trivially equal comparison).
  init = _np_params(_fresh(init_params))
  assert max(np.max(np.abs(a - p)) for a, p in zip(_np_params(s8), init)) > 1e-3


def test_same_init_and_key_are_bit_identical(init_params, step8):
  a, losses_a, _ = _run(step8, _fresh(init_params), 3)
  b, losses_b, _ = _run(step8, _fresh(init_params), 3)
  np.testing.assert_array_equal(losses_a, losses_b)
  for x, y in zip(_np_params(a), _np_params(b)):
    np.testing.assert_array_equal(x, y)
  # A different key gives a different run.
  c = _fresh(init_params)
  for _ in range(3):
    c, _ = step8(c, X0, jax.random.key(8))
  assert any(not np.array_equal(x, y) for x, y in zip(_np_params(a), _np_params(c)))


def test_ema_decay_warmup_values():
  cfg = OptimConfig(ema_decay=0.999)
  got = [float(ema_decay_at(cfg, k)) for k in (0, 1, 8, 990, 10_000)]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 9 / 18, 991 / 1000, 0.999], rtol=1e-6)
  fixed = OptimConfig(ema_decay=0.99, ema_warmup=False)
  assert float(ema_decay_at(fixed, 0)) == pytest.approx(0.99)


_CALLS = []


class _Recorder(nnx.Module):
  """A stand-in UNet that records (labels, x0_prev) of every call into _CALLS."""

  def __init__(self):
    self.cfg = UNetConfig(self_condition=True)
    self.w = nnx.Param(jnp.ones((D,)))

  def __call__(self, x_t, t, known_mask, known, labels=None, x0_prev=None, *, deterministic):
    _CALLS.append((labels, x0_prev))
    return x_t * self.w[...]


@pytest.mark.slow
def test_self_conditioning_and_label_dropout_inputs():
  """Second pass gets stop-gradient x0 estimates for ~p of the rows and zeros for the rest;
  labels are nulled with probability label_dropout."""
  b = 512
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(b, N, D)), jnp.float32)
  labels = jnp.arange(b) % 3
  state = init_train_state(_Recorder(), make_optimizer(OPTIM))
  _CALLS.clear()
  train_step(state, x0, KEY, labels, diffusion_cfg=DIFF, optimizer=make_optimizer(OPTIM),
             optim_cfg=OPTIM, self_condition_prob=0.25, label_dropout=0.4)
  (labels1, prev1), (labels2, prev2) = _CALLS
  assert prev1 is None
  used = np.asarray(jnp.any(prev2 != 0, axis=(1, 2)))
  assert abs(used.mean() - 0.25) < 0.07, used.mean()
  nulled = np.asarray(labels2) == diffusion.NULL_LABEL
  assert abs(nulled.mean() - 0.4) < 0.07, nulled.mean()
  np.testing.assert_array_equal(np.asarray(labels2)[~nulled], np.asarray(labels)[~nulled])
  np.testing.assert_array_equal(np.asarray(labels1), np.asarray(labels2))


@pytest.mark.slow
def test_self_conditioned_unet_trains():
  cfg = dataclasses.replace(CFG, self_condition=True, num_classes=3, dropout=0.0)
  model = UNet(D, cfg, rngs=nnx.Rngs(0))
  step = make_train_step(DIFF, OPTIM, make_mesh({"data": 1}), DEFAULT_RULES)
  state = init_train_state(model, make_optimizer(OPTIM))
  labels = np.arange(B) % 3
  losses = []
  for _ in range(25):
    state, metrics = step(state, X0, KEY, labels)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_bfloat16_bridge_computes_in_bfloat16_near_float32(kind):
  """bridge.dtype=bfloat16: the same float32 parameters, matmuls in bfloat16, a float32
  output within bfloat16's precision of the float32 denoiser's (and not equal to it)."""
  from dihal_jax import defaults
  from dihal_jax.backbone.config import BackboneConfig
  from dihal_jax.bridge import denoiser
  from dihal_jax.bridge.normalization import Normalizer
  from dihal_jax.overrides import overridden
  tiny = defaults.load_config_file("configs/tiny_llama.py")
  block_cfg = BackboneConfig.from_hf_config(tiny.model.hf_config.to_dict())
  d = block_cfg.hidden_size
  norm = Normalizer("per_channel", np.zeros(d, np.float32), np.ones(d, np.float32))
  models = {}
  for dtype in ("float32", "bfloat16"):
    config = overridden(tiny, {"bridge.denoiser": kind, "bridge.dtype": dtype,
                               "bridge.unet.channels": 16, "bridge.unet.groups": 4,
                               "bridge.transformer.blocks": 2})
    models[dtype] = denoiser.build(config.bridge, d, norm, seed=0, block_cfg=block_cfg)
  # Random parameters (the output heads start at zero, which would make the test vacuous),
  # the same in both.
  params = nnx.state(models["float32"], nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  perturbed = jax.tree.unflatten(treedef, [
      p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
  for model in models.values():
    nnx.update(model, perturbed)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, d)), jnp.float32)
  args = (x, jnp.array([0.3, 0.8]), jnp.zeros((2, 8), bool), jnp.zeros_like(x))
  ref, low = (np.asarray(models[k](*args)) for k in ("float32", "bfloat16"))
  assert low.dtype == np.float32
  scale = np.sqrt(np.mean(ref ** 2))
  assert scale > 1e-2
  error = np.sqrt(np.mean((low - ref) ** 2)) / scale
  assert 1e-5 < error < 5e-2, error  # bfloat16 carries 8 bits of mantissa: ~0.4% per rounding
