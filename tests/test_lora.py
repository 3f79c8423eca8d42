"""LoRA adapters of the backbone (backbone/lora.py): the adapted JAX model against transformers'
model with (alpha / r) A B added to each nn.Linear weight by hand, a fresh adapter as the
identity, and the DGLM projector's step training the adapters and never the backbone."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dihal_jax.backbone.lora import KERNELS, LoRA, parse_targets
from dihal_jax.bridge.train_step import OptimConfig, init_train_state, make_optimizer
from dihal_jax.dglm import soft_prompt
from dihal_jax.errors import UserInputError

TORCH_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _randomised(model, targets, rank=3, alpha=6.0, first_layer=0):
  """An adapter whose B is random too (a fresh one is the identity)."""
  lora = LoRA(model, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(0),
              first_layer=first_layer)
  rng = np.random.default_rng(1)
  for name in targets:
    lora.b[name][...] = jnp.asarray(rng.normal(size=lora.b[name].shape) * 0.2, jnp.float32)
  return lora


@pytest.mark.parametrize("targets,first_layer", [(tuple(KERNELS), 0), (("v_proj", "o_proj"), 0),
                                                 (tuple(KERNELS), 1)])
def test_adapted_logits_match_transformers_with_the_delta_added_by_hand(models, targets,
                                                                        first_layer):
  model, hf = models
  lora = _randomised(model, targets, first_layer=first_layer)
  tokens = np.random.default_rng(2).integers(3, model.cfg.vocab_size, (2, 11)).astype(np.int32)
  ours = np.asarray(lora.apply(model)(jnp.asarray(tokens)))
  ref_model = copy.deepcopy(hf)
  with torch.no_grad():
    for name in targets:
      a = np.asarray(lora.a[name][...], np.float64)
      b = np.asarray(lora.b[name][...], np.float64)
      for layer, block in enumerate(ref_model.model.layers[first_layer:]):
        linear = getattr(getattr(block, TORCH_MODULE[name]), name)
        delta = (lora.scale * a[layer] @ b[layer]).T  # nn.Linear holds [out, in]
        linear.weight += torch.tensor(delta, dtype=linear.weight.dtype)
    ref = ref_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    plain = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(ref - plain).max() > 1e-2  # the delta matters at this size
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  if first_layer:  # the layers below keep their weights: their states are the backbone's
    np.testing.assert_array_equal(np.asarray(lora.apply(model).lower(jnp.asarray(tokens),
                                                                     first_layer)),
                                  np.asarray(model.lower(jnp.asarray(tokens), first_layer)))


def test_a_fresh_adapter_is_the_identity_and_apply_keeps_the_original(models):
  model, _ = models
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, model.cfg.vocab_size, (2, 7)),
                       jnp.int32)
  fresh = LoRA(model, rank=4, alpha=8.0, targets=tuple(KERNELS), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(fresh.apply(model)(tokens)), np.asarray(model(tokens)))
  before = np.asarray(model.layers.attn.q_proj[...])
  _randomised(model, ("q_proj",)).apply(model)
  np.testing.assert_array_equal(np.asarray(model.layers.attn.q_proj[...]), before)


def test_the_projector_step_trains_the_adapters_and_not_the_backbone(models):
  model, _ = models
  kernels = {n: np.asarray(LoRA._kernel(model, n)[...]) for n in KERNELS}
  lora = LoRA(model, rank=2, alpha=4.0, targets=tuple(KERNELS), rngs=nnx.Rngs(0))
  projector = soft_prompt.Projector(5, model.cfg.hidden_size, vectors=2, hidden=8,
                                    embed_rms=0.02, rngs=nnx.Rngs(1), lora=lora)
  optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4, ema_decay=0.0)
  optimizer = make_optimizer(optim)
  state = init_train_state(projector, optimizer)
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(3, model.cfg.vocab_size, (4, 10)), jnp.int32)
  latent = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  for _ in range(3):
    state, metrics = soft_prompt.train_step(state, model, tokens, latent, jax.random.key(0),
                                            prefix=3, optimizer=optimizer, optim_cfg=optim,
                                            noise=0.0, dropout=0.0)
  trained = state.model()
  assert all(np.abs(np.asarray(trained.lora.b[n][...])).max() > 0 for n in KERNELS)
  for name, kernel in kernels.items():
    np.testing.assert_array_equal(np.asarray(LoRA._kernel(model, name)[...]), kernel)
  assert np.isfinite(float(metrics["loss"]))
  # Its validation NLL (the report's too) is read by the adapted decoder.
  adapted = float(soft_prompt.continuation_nll(trained.lora.apply(model), trained(latent),
                                               tokens, 3))
  plain = float(soft_prompt.continuation_nll(model, trained(latent), tokens, 3))
  ours = float(soft_prompt.validation_nll(trained, model, tokens, latent, prefix=3))
  assert ours == pytest.approx(adapted, rel=1e-6) and abs(ours - plain) > 1e-3


def test_unknown_kernel_names_are_refused():
  assert parse_targets(" q_proj, down_proj ") == ("q_proj", "down_proj")
  for spec in ("q_proj,wq", "", "attn"):
    with pytest.raises(UserInputError, match="lora_targets"):
      parse_targets(spec)
