"""The bridge UNet: shapes, numerics of its parts against float64 NumPy, conditioning.

Sizes are deliberately odd (d=60, B=3) so that no axis is confused with
another. Speed on a small CPU: every random initializer compiles once per
parameter shape (~0.5 s each, ~10 s per model), so most tests build the model
abstractly (`nnx.eval_shape`) and draw its parameters with NumPy, output
projection included (the real one is zero at init, which would hide how the
output depends on the inputs); the init itself is tested on one real model.
Forward passes go through one jitted function, with the same argument
structure wherever possible, so that XLA compiles few programs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dihal_jax.bridge.unet import (SelfAttention, UNet, UNetConfig, conv1d, group_norm,
                                   num_params, sinusoidal_embedding)
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh, param_shardings

D, B, N = 60, 3, 16
# The workhorse: two levels, attention at the coarse one, labels, self-conditioning, dropout.
MAIN = UNetConfig(channels=16, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,),
                  heads=2, groups=4, num_classes=5, self_condition=True, dropout=0.1)
THREE_LEVELS = UNetConfig(channels=16, channel_mults=(1, 2, 3), blocks_per_level=2,
                          attention_levels=(0, 1, 2), heads=4, groups=4)
NO_ATTENTION = UNetConfig(channels=8, channel_mults=(1, 1), blocks_per_level=1,
                          attention_levels=(), groups=2)
LABELS = jnp.array([2, -1, 4])


@nnx.jit(static_argnames="deterministic")
def _apply(model, x_t, t, mask, known, labels=None, x0_prev=None, deterministic=True):
  return model(x_t, t, mask, known, labels, x0_prev, deterministic=deterministic)


def _inputs(n=N, seed=0, d=D):
  """x_t, t, known_mask, known (NumPy-drawn: eager jax.random would compile per shape)."""
  rng = np.random.default_rng(seed)
  mask = rng.random((B, n)) < 0.3
  mask[:, 0] = True
  known = np.where(mask[..., None], rng.normal(size=(B, n, d)), 0.0)
  return tuple(jnp.asarray(a, jnp.float32 if a.dtype == np.float64 else a.dtype)
               for a in (rng.normal(size=(B, n, d)), rng.random(B), mask, known))


def _model(cfg=MAIN, d=D, seed=0, dtype=jnp.float32):
  """A UNet with NumPy-drawn parameters (the output projection is random, not zero)."""
  abstract = nnx.eval_shape(lambda: UNet(d, cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    if len(spec.shape) == 1:  # norm scales near 1, biases near 0
      return jnp.asarray((path[-2].key == "scale") + 0.1 * rng.normal(size=spec.shape),
                         spec.dtype)
    fan_in = math.prod(spec.shape[:-1])
    return jnp.asarray(rng.normal(size=spec.shape) / math.sqrt(fan_in), spec.dtype)

  def other(spec):  # dropout RNG streams
    if jnp.issubdtype(spec.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    return jnp.zeros(spec.shape, spec.dtype)

  params = jax.tree_util.tree_map_with_path(draw, params)
  return nnx.merge(graphdef, params, jax.tree.map(other, rest))


@pytest.fixture(scope="module")
def main_model():
  """Read-only MAIN model (tests that change a model build their own)."""
  return _model()


# --- 1. shapes, dtypes, input validation ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cfg, n", [(MAIN, N), (MAIN, 32), (THREE_LEVELS, N),
                                    (NO_ATTENTION, N)])
def test_output_shape_and_dtype(cfg, n):
  model = _model(cfg)
  x_t, t, mask, known = _inputs(n)
  extra = dict(labels=LABELS, x0_prev=0.5 * x_t) if cfg is MAIN else {}
  out = _apply(model, x_t, t, mask, known, **extra)
  assert out.shape == (B, n, D) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  # Rows are independent: the reversed batch (its own x_t, t, mask, labels each) gives the
  # reversed outputs, row by row (a norm over the batch or a transposed reshape fails here),
  # and different rows give different outputs.
  flipped = _apply(model, *(a[::-1] for a in (x_t, t, mask, known)),
                   **{k: v[::-1] for k, v in extra.items()})
  np.testing.assert_allclose(np.asarray(flipped)[::-1], np.asarray(out), atol=1e-5)
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


@pytest.mark.slow
def test_bfloat16_compute_returns_float32_close_to_float32(main_model):
  args = _inputs() + (LABELS, _inputs()[0])
  ref = _apply(main_model, *args)
  out = _apply(_model(dtype=jnp.bfloat16), *args)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 0.05, rel


@pytest.mark.slow
def test_labels_time_and_self_conditioning_change_the_output(main_model):
  x_t, t, mask, known = _inputs()
  zeros, null = jnp.zeros_like(x_t), jnp.full((B,), -1)
  base = _apply(main_model, x_t, t, mask, known, null, zeros)
  # labels=None is the null label (-1) for every row; x0_prev=None is zeros.
  np.testing.assert_allclose(_apply(main_model, x_t, t, mask, known), base, atol=1e-5)
  with_label = _apply(main_model, x_t, t, mask, known, LABELS, zeros)
  changed = np.abs(np.asarray(with_label - base)).max(axis=(1, 2)) > 1e-4
  np.testing.assert_array_equal(changed, [True, False, True])
  assert not np.allclose(base, _apply(main_model, x_t, t, mask, known, null, x_t), atol=1e-4)
  assert not np.allclose(base, _apply(main_model, x_t, 1.0 - t, mask, known, null, zeros),
                         atol=1e-4)


@pytest.mark.slow
def test_dropout_only_when_not_deterministic():
  model = _model()
  args = _inputs() + (LABELS, _inputs()[0])
  a = _apply(model, *args)
  np.testing.assert_array_equal(a, _apply(model, *args))
  b = _apply(model, *args, deterministic=False)
  c = _apply(model, *args, deterministic=False)  # the dropout stream advances
  assert not np.allclose(a, b, atol=1e-4) and not np.allclose(b, c, atol=1e-4)


@pytest.mark.slow
def test_bad_inputs_raise():
  model = _model(THREE_LEVELS)  # n must be a multiple of 4
  x_t, t, mask, known = _inputs(18)
  with pytest.raises(ValueError, match="n=18"):
    _apply(model, x_t, t, mask, known)
  x_t, t, mask, known = _inputs()
  with pytest.raises(ValueError, match="labels"):
    _apply(model, x_t, t, mask, known, labels=LABELS)
  with pytest.raises(ValueError, match="x0_prev"):
    _apply(model, x_t, t, mask, known, x0_prev=x_t)
  with pytest.raises(ValueError, match="d=60"):
    _apply(model, x_t[..., :59], t, mask, known[..., :59])
  with pytest.raises(ValueError, match="max_len=8"):
    _apply(_model(UNetConfig(**{**vars(THREE_LEVELS), "max_len": 8})), x_t, t, mask, known)


@pytest.mark.parametrize("change, match", [
    (dict(groups=5), "divisible by 5 groups"),
    (dict(heads=3), "divisible by 3 heads"),
    (dict(attention_levels=(2,)), "attention_levels"),
    (dict(channels=15), "channels=15"),
    (dict(channel_mults=()), "channel_mults"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises(change, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: UNet(D, UNetConfig(**{**vars(MAIN), **change}), rngs=nnx.Rngs(0)))


# --- 2. the real init: zero output, one optimizer step -----------------------------------

@pytest.mark.slow
def test_initial_output_is_zero_and_one_adam_step_lowers_the_loss():
  # Few distinct parameter shapes and an RBG key: the same initializers, cheaper to compile.
  cfg = UNetConfig(channels=8, channel_mults=(1, 1), blocks_per_level=1, attention_levels=(1,),
                   heads=2, groups=2)
  model = UNet(D, cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  assert abs(float(jnp.std(model.in_x[...])) * math.sqrt(D) - 1) < 0.2  # lecun: 1/sqrt(fan_in)
  args = _inputs()
  target = jnp.asarray(np.random.default_rng(7).normal(size=args[0].shape), jnp.float32)
  assert not np.asarray(_apply(model, *args)).any()  # exactly 0

  def loss_fn(m):
    return jnp.mean(jnp.square(m(*args) - target))

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss, grads["out_proj"][...]

  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  loss0, out_grad = step(model, optimizer)
  assert float(jnp.abs(out_grad).max()) > 0
  loss1 = jnp.mean(jnp.square(_apply(model, *args) - target))
  assert float(loss1) < float(loss0) - 1e-4, (float(loss0), float(loss1))


# --- 3. parts against float64 NumPy ---------------------------------------------------------

def test_group_norm_matches_numpy():
  c, groups = 12, 3  # the nnx.GroupNorm as the UNet configures it
  norm = group_norm(c, groups, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  scale, bias = rng.normal(size=c), rng.normal(size=c)
  norm.scale.set_value(jnp.asarray(scale, jnp.float32))
  norm.bias.set_value(jnp.asarray(bias, jnp.float32))
  x = rng.normal(size=(B, 10, c)) * 3 + 1.5
  want = np.empty_like(x)
  for b in range(B):
    for g in range(groups):
      block = x[b, :, g * 4:(g + 1) * 4]  # every position, the 4 channels of group g
      want[b, :, g * 4:(g + 1) * 4] = (block - block.mean()) / np.sqrt(block.var() + 1e-5)
  want = want * scale + bias
  np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), want, atol=2e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv1d_matches_numpy(stride):
  c_in, c_out, n = 5, 7, 12
  conv = nnx.eval_shape(lambda: conv1d(c_in, c_out, stride=stride, dtype=jnp.float32,
                                       param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  w, bias = rng.normal(size=(3, c_in, c_out)), rng.normal(size=c_out)
  conv.kernel.set_value(jnp.asarray(w, jnp.float32))
  conv.bias.set_value(jnp.asarray(bias, jnp.float32))
  x = rng.normal(size=(B, n, c_in))
  padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
  want = np.tile(bias, (B, n // stride, 1))
  for b in range(B):
    for i in range(n // stride):
      for k in range(3):  # tap k reads position i*stride + k - 1 (cross-correlation)
        want[b, i] += padded[b, i * stride + k] @ w[k]
  np.testing.assert_allclose(conv(jnp.asarray(x, jnp.float32)), want, atol=1e-5)


def test_sinusoidal_embedding_matches_formula():
  dim = 10
  x = np.array([0.0, 1.0, 37.5, 999.0])
  want = np.empty((len(x), dim))
  for j, value in enumerate(x):
    for i in range(dim // 2):
      freq = 10000.0 ** (-i / (dim // 2))
      want[j, i] = math.sin(value * freq)
      want[j, dim // 2 + i] = math.cos(value * freq)
  np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(x), dim), want, atol=1e-4)


def test_self_attention_matches_numpy():
  c, heads, n = 12, 3, 9
  cfg = UNetConfig(channels=c, heads=heads, groups=3)
  attn = nnx.eval_shape(lambda: SelfAttention(c, cfg, dtype=jnp.float32,
                                              param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  hd = c // heads
  wq, wk, wv = (rng.normal(size=(c, heads, hd)) / math.sqrt(c) for _ in range(3))
  wo, bo = rng.normal(size=(heads, hd, c)) / math.sqrt(c), rng.normal(size=c)
  for var, value in [(attn.q_proj, wq), (attn.k_proj, wk), (attn.v_proj, wv), (attn.o_proj, wo),
                     (attn.o_bias, bo), (attn.norm.scale, np.ones(c)),
                     (attn.norm.bias, np.zeros(c))]:
    var.set_value(jnp.asarray(value, jnp.float32))
  x = rng.normal(size=(B, n, c))
  want = x + bo
  for b in range(B):
    y = x[b].reshape(n, 3, 4)  # GroupNorm, 3 groups of 4 channels, unit scale
    y = ((y - y.mean(axis=(0, 2), keepdims=True))
         / np.sqrt(y.var(axis=(0, 2), keepdims=True) + 1e-5)).reshape(n, c)
    for m in range(heads):
      q, k, v = y @ wq[:, m], y @ wk[:, m], y @ wv[:, m]
      logits = q @ k.T / math.sqrt(hd)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      want[b] += probs @ v @ wo[m]
  np.testing.assert_allclose(attn(jnp.asarray(x, jnp.float32)), want, atol=1e-4)


# --- 4. bidirectional ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cfg", [MAIN, THREE_LEVELS])
def test_information_flows_both_ways(cfg, main_model):
  model = main_model if cfg is MAIN else _model(cfg)
  x_t, t, mask, known = _inputs()
  extra = (LABELS, x_t) if cfg is MAIN else ()
  base = _apply(model, x_t, t, mask, known, *extra)
  last = _apply(model, x_t.at[:, -1].add(1.0), t, mask, known, *extra)
  first = _apply(model, x_t.at[:, 0].add(1.0), t, mask, known, *extra)
  assert np.abs(np.asarray(last - base)[:, 0]).min(axis=-1).max() > 0  # last -> first
  assert np.abs(np.asarray(last - base)[:, 0]).max() > 1e-4
  assert np.abs(np.asarray(first - base)[:, -1]).max() > 1e-4  # first -> last


# --- 5. known-position conditioning ---------------------------------------------------

def test_known_values_matter_only_where_known(main_model):
  x_t, t, mask, known = _inputs()
  mask = mask.at[:, 5].set(True).at[:, 6].set(False)
  extra = (LABELS, x_t)
  base = _apply(main_model, x_t, t, mask, known, *extra)
  at_known = _apply(main_model, x_t, t, mask, known.at[:, 5].add(1.0), *extra)
  at_unknown = _apply(main_model, x_t, t, mask, known.at[:, 6].add(1.0), *extra)
  assert np.abs(np.asarray(at_known - base)).max() > 1e-4
  np.testing.assert_array_equal(at_unknown, base)
  # The mask itself is an input: flipping it at a position with known == 0 matters.
  flipped = _apply(main_model, x_t, t, mask.at[:, 6].set(True), known, *extra)
  assert np.abs(np.asarray(flipped - base)).max() > 1e-4


# --- 6. sharding metadata ----------------------------------------------------------------

def test_every_param_has_logical_axes_and_sharded_forward_matches():
  model = _model()
  is_var = lambda v: isinstance(v, nnx.Variable)
  params = nnx.state(model, nnx.Param)
  variables = jax.tree.leaves(params, is_leaf=is_var)
  assert len(variables) > 50
  for var in variables:
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.ndim, (axes, var.shape)
  assert num_params(model) == sum(v.size for v in variables)

  args = _inputs() + (LABELS, _inputs(seed=1)[0])
  want = _apply(model, *args)
  # d=60 splits 4 ways over fsdp ("embed"), 2 heads over tensor.
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shardings = param_shardings(params, mesh, DEFAULT_RULES)
  nnx.update(model, jax.tree.map(jax.device_put, params, shardings))
  spread = [len(v.get_value().sharding.device_set)
            for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_var)
            if any(a is not None for a in v.get_value().sharding.spec)]
  assert len(spread) >= 5 and all(s == 8 for s in spread)
  np.testing.assert_allclose(_apply(model, *args), want, atol=1e-5)


# --- 7. PCA init of the input projection ------------------------------------------------

def test_init_input_projection_sets_the_x_part():
  model = _model()
  others = {k: np.asarray(getattr(model, k)[...]) for k in ("in_known", "in_mask", "in_self")}
  comps = np.linalg.qr(np.random.default_rng(3).normal(size=(D, MAIN.channels)))[0]
  model.init_input_projection(comps)
  np.testing.assert_array_equal(model.in_x[...], comps.astype(np.float32))
  assert model.in_x.get_metadata()["logical_axes"] == ("embed", "channels")
  for k, v in others.items():
    np.testing.assert_array_equal(getattr(model, k)[...], v)
  with pytest.raises(ValueError, match=r"\(60, 16\)"):
    model.init_input_projection(comps.T)
