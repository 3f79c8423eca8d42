"""The upper-layer token loss (bridge/train_step.py::UpperCE): on clean states it is
transformers' own next-token cross-entropy over the unknown positions (float64 NumPy on
its logits), and the jitted data-parallel step adds it to the loss, trains the denoiser
through it and never changes the backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import torch
from flax import nnx

from dihal_jax.bridge.diffusion import DiffusionConfig
from dihal_jax.bridge.normalization import Normalizer
from dihal_jax.bridge.train_step import (OptimConfig, UpperCE, init_train_state,
                                         make_optimizer, make_train_step, upper_token_loss)
from dihal_jax.bridge.unet import UNet, UNetConfig
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

LAYER = 1


def _norm(model, rng):
  d = model.cfg.hidden_size
  return Normalizer("per_channel", rng.normal(size=d).astype(np.float32) * 0.1,
                    rng.uniform(0.5, 2.0, d).astype(np.float32))


def _upper(model, norm):
  return {"backbone": nnx.state(model), "norm": norm}


def test_on_clean_states_it_is_the_next_token_loss_of_transformers_over_unknown_tokens(models):
  model, hf = models
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, model.cfg.vocab_size, (3, 10)).astype(np.int32)
  unknown = rng.random((3, 10)) < 0.6
  unknown[:, 0] = False
  norm = _norm(model, rng)
  z = norm.forward(model.lower(jnp.asarray(tokens), LAYER))
  cfg = UpperCE(weight=1.0, windows=2, layer=LAYER, graphdef=nnx.graphdef(model))
  got = float(upper_token_loss(z, jnp.asarray(tokens), jnp.asarray(unknown),
                               _upper(model, norm), cfg))
  with torch.no_grad():
    logits = hf(torch.tensor(tokens[:2], dtype=torch.long)).logits.double().numpy()
  logp = scipy.special.log_softmax(logits[:, :-1], axis=-1)
  nll = -np.take_along_axis(logp, tokens[:2, 1:, None], axis=-1)[..., 0]
  want = nll[unknown[:2, 1:]].mean()
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_the_step_adds_it_trains_the_denoiser_through_it_and_keeps_the_backbone(models):
  model, _ = models
  rng = np.random.default_rng(1)
  d, n, b = model.cfg.hidden_size, 8, 8
  norm = _norm(model, rng)
  tokens = rng.integers(3, model.cfg.vocab_size, (b, n)).astype(np.int32)
  x0 = np.asarray(norm.forward(model.lower(jnp.asarray(tokens), LAYER)))
  unet_cfg = UNetConfig(channels=16, channel_mults=(1, 2), blocks_per_level=1,
                        attention_levels=(1,), heads=2, groups=4)
  optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10, ema_decay=0.0)
  diff = DiffusionConfig()
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
  mesh = make_mesh({"data": 8})
  params = {}
  for weight in (0.0, 1.0):
    state = init_train_state(UNet(d, unet_cfg, rngs=nnx.Rngs(0)), make_optimizer(optim))
    upper = UpperCE(weight=weight, windows=2, layer=LAYER, graphdef=nnx.graphdef(model))
    step = make_train_step(diff, optim, mesh, DEFAULT_RULES, upper_ce=upper,
                           upper=_upper(model, norm))
    for _ in range(2):  # the warm-up's first step has learning rate 0
      state, metrics = step(state, x0, jax.random.key(0), tokens=tokens)
    assert float(metrics["upper_ce"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["mse"]) + weight * float(metrics["upper_ce"]),
                               rtol=1e-5)
    params[weight] = [np.asarray(p) for p in jax.tree.leaves(state.params)]
  # the same draws, so the only difference between the two steps is the loss's gradient
  assert any(not np.array_equal(a, c) for a, c in zip(params[0.0], params[1.0]))
  for x, y in zip(before, jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(x, np.asarray(y))
