"""The attention kernels (`model.attention`): `jax.nn.dot_product_attention` against the
explicit reference path, float32 at the highest precision, on a tiny GQA model with
padding (fully masked query rows included), a bidirectional pattern and the cached decode;
and what "auto" resolves to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.model import attention_kernel, init_model
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models():
  """{kernel: Decoder}, the same seeded weights; 6 query heads over 2 kv heads."""
  cfg = BackboneConfig.from_hf_config(load_config("tiny_llama").model.hf_config.to_dict())
  assert cfg.num_heads // cfg.num_kv_heads == 3
  mesh = make_mesh({"data": 1})
  return {k: init_model(cfg, mesh=mesh, rules=DEFAULT_RULES, seed=3, attention=k)
          for k in ("reference", "xla")}


def _batch(vocab, t=12):
  """Tokens [3, t] and a mask: full, right-padded, left-padded (its first queries see no key)."""
  tokens = np.random.default_rng(0).integers(0, vocab, (3, t)).astype(np.int32)
  mask = np.ones((3, t), bool)
  mask[1, t - 5:] = False
  mask[2, :4] = False
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("pattern", ["causal", "bidirectional"])
def test_xla_kernel_matches_the_reference(models, pattern):
  tokens, mask = _batch(models["xla"].cfg.vocab_size)
  t = tokens.shape[1]
  attention = None if pattern == "causal" else jnp.ones((t, t), bool)
  with jax.default_matmul_precision("highest"):
    out = {k: np.asarray(m(tokens, mask=mask, attention=attention)) for k, m in models.items()}
  assert np.isfinite(out["xla"]).all()  # padding rows included
  np.testing.assert_allclose(out["xla"], out["reference"], **TOL)


def test_xla_kernel_matches_the_reference_in_the_cached_decode(models):
  tokens, mask = _batch(models["xla"].cfg.vocab_size)
  b, p = tokens.shape
  cfg = models["xla"].cfg
  s = p + 2
  key_mask = jnp.concatenate([mask, jnp.ones((b, 2), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = {}
  with jax.default_matmul_precision("highest"):
    for kernel, model in models.items():
      cache = jnp.zeros((cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
      prefill, k, v = model.decode_step(tokens, positions, cache, cache, 0, key_mask)
      step, k, v = model.decode_step(tokens[:, -1:], positions[:, -1:] + 1, k, v, p, key_mask)
      out[kernel] = [np.asarray(x) for x in (prefill, step, k, v)]
  for xla, ref in zip(out["xla"], out["reference"]):
    assert np.isfinite(xla).all()
    np.testing.assert_allclose(xla, ref, **TOL)


def test_auto_is_xla_on_cpu_and_never_cudnn(models):
  assert jax.default_backend() == "cpu"
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    assert attention_kernel("auto", dtype, 64, 256, 256, "cpu") == "xla"
  tokens, mask = _batch(models["xla"].cfg.vocab_size)
  auto = init_model(models["xla"].cfg, mesh=make_mesh({"data": 1}), rules=DEFAULT_RULES,
                    dtype=jnp.bfloat16, attention="auto")
  hlo = jax.jit(lambda x, m: auto(x, mask=m)).lower(tokens, mask).as_text()
  assert "cudnn" not in hlo.lower() and "custom_call" not in hlo


def test_auto_takes_cudnn_only_where_it_applies():
  assert attention_kernel("auto", jnp.bfloat16, 64, 256, 256, "gpu") == "cudnn"
  assert attention_kernel("auto", jnp.float32, 64, 256, 256, "gpu") == "xla"
  assert attention_kernel("auto", jnp.bfloat16, 10, 256, 256, "gpu") == "xla"  # head dim
  assert attention_kernel("auto", jnp.bfloat16, 64, 1, 257, "gpu") == "xla"  # odd lengths
  assert attention_kernel("reference", jnp.bfloat16, 64, 256, 256, "gpu") == "reference"


@pytest.mark.parametrize("name,dtype,platform,message", [
    ("flash", jnp.float32, "cpu", "--config.model.attention='flash': expected one of"),
    ("cudnn", jnp.bfloat16, "cpu", "--config.model.attention=cudnn: needs a GPU"),
    ("cudnn", jnp.float32, "gpu", "--config.model.attention=cudnn: needs --config.model.dtype"),
])
def test_impossible_kernels_name_the_flag(name, dtype, platform, message):
  with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
    attention_kernel(name, dtype, 64, 256, 256, platform)
