"""The JAX backbone against `transformers` (float32, CPU) on tiny random models.

Levanter-style: a seeded random HF model is saved with `save_pretrained`,
loaded through our safetensors conversion, and compared on logits, every
hidden state and greedy generation; then exported back and reloaded by HF.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import load_config
from dihal_jax.backbone import parity
from dihal_jax.backbone.checkpoint import random_hf_checkpoint
from dihal_jax.backbone.convert import compare_checkpoints, load_model, save_hf_checkpoint
from dihal_jax.backbone.generate import generate
from dihal_jax.backbone.model import RMSNorm
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh

# (config, num_key_value_heads): MQA, GQA and plain MHA for Llama; GQA and MHA for Qwen3.
VARIANTS = [("tiny_llama", 1), ("tiny_llama", 2), ("tiny_llama", 6), ("tiny_qwen3", 2),
            ("tiny_qwen3", 4)]


@pytest.fixture(scope="module")
def single_mesh():
  return make_mesh({"data": 1})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("variants")
  out = {}
  for name, kv in VARIANTS:
    hf = load_config(name).model.hf_config.to_dict()
    hf["num_key_value_heads"] = kv
    if name == "tiny_llama" and kv == 6:
      hf["attention_bias"] = True  # bias flags exercised on one variant
      hf["mlp_bias"] = True
    out[(name, kv)] = random_hf_checkpoint(hf, root / f"{name}_kv{kv}", seed=kv)
  return out


def _batch(vocab, rows=3, t=260, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, t)).astype(np.int32)
  return parity.padded_batch(tokens, pad_id=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{n}-kv{k}" for n, k in VARIANTS])
def test_logits_and_hidden_states_match_torch(variant, checkpoints, single_mesh):
  path = checkpoints[variant]
  model = load_model(path, mesh=single_mesh, rules=DEFAULT_RULES)
  torch_model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
  tokens, mask = _batch(model.cfg.vocab_size)
  result = parity.compare_forward(model, torch_model.eval(), tokens, mask)
  assert result["max_abs_logit_diff"] < 1e-4
  assert result["mean_kl"] < 1e-9
  assert result["argmax_agreement"] == 1.0
  assert len(result["hidden_max_abs_diff"]) == model.cfg.num_layers + 1
  assert max(result["hidden_max_abs_diff"]) < 1e-4


@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[3]], ids=["llama", "qwen3"])
def test_greedy_generation_matches_transformers(variant, checkpoints, single_mesh):
  path = checkpoints[variant]
  model = load_model(path, mesh=single_mesh, rules=DEFAULT_RULES)
  torch_model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
  prompt = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (2, 17)).astype(np.int32)
  result = parity.compare_generation(model, torch_model, prompt, 24, pad_id=0)
  assert result["equal"], result


def test_left_padded_generation_matches_transformers(checkpoints, single_mesh):
  path = checkpoints[("tiny_llama", 2)]
  model = load_model(path, mesh=single_mesh, rules=DEFAULT_RULES)
  torch_model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
  prompt = np.random.default_rng(2).integers(3, model.cfg.vocab_size, (2, 15)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  mask[1, :6] = False
  prompt[1, :6] = 0
  with torch.inference_mode():
    ref = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long),
                               attention_mask=torch.as_tensor(mask, dtype=torch.long),
                               do_sample=False, max_new_tokens=16, eos_token_id=None,
                               pad_token_id=0)[:, 15:].numpy()
  ours = np.asarray(generate(model, prompt, mask, max_new_tokens=16))
  np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
def test_lower_upper_split_equals_forward_for_every_layer(checkpoints, single_mesh):
  model = load_model(checkpoints[("tiny_qwen3", 2)], mesh=single_mesh, rules=DEFAULT_RULES)
  tokens, mask = _batch(model.cfg.vocab_size, t=40)
  full = np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))
  hidden = model.hidden_states(jnp.asarray(tokens), [1, 2], mask=jnp.asarray(mask))
  for layer in range(model.cfg.num_layers + 1):
    h = model.lower(jnp.asarray(tokens), layer, mask=jnp.asarray(mask))
    split = np.asarray(model.upper(h, layer, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(split, full, atol=1e-6, rtol=0)
    if layer in hidden:
      np.testing.assert_array_equal(np.asarray(hidden[layer]), np.asarray(h))


def test_export_reloads_in_transformers_and_roundtrips_bitwise(checkpoints, single_mesh, tmp_path):
  path = checkpoints[("tiny_llama", 6)]
  model = load_model(path, mesh=single_mesh, rules=DEFAULT_RULES)
  out = save_hf_checkpoint(model, tmp_path / "export", max_shard_bytes=30_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1  # really sharded
  assert compare_checkpoints(path, out)["bit_identical"]
  tokens = torch.as_tensor(_batch(model.cfg.vocab_size, t=30)[0], dtype=torch.long)
  with torch.inference_mode():
    a = AutoModelForCausalLM.from_pretrained(str(path))(tokens).logits
    b = AutoModelForCausalLM.from_pretrained(str(out))(tokens).logits
  assert torch.equal(a, b)


def test_bfloat16_checkpoint_roundtrip_without_torch_in_the_path(checkpoints, single_mesh,
                                                                  tmp_path):
  src = checkpoints[("tiny_qwen3", 2)]
  bf16_dir = tmp_path / "bf16"
  AutoModelForCausalLM.from_pretrained(str(src)).to(torch.bfloat16).save_pretrained(bf16_dir)
  for param_dtype in (jnp.bfloat16, jnp.float32):
    model = load_model(bf16_dir, mesh=single_mesh, rules=DEFAULT_RULES, param_dtype=param_dtype)
    assert model.embed[...].dtype == param_dtype
    out = save_hf_checkpoint(model, tmp_path / f"out_{jnp.dtype(param_dtype).name}",
                             dtype="bfloat16")
    assert compare_checkpoints(bf16_dir, out)["bit_identical"]


def test_rmsnorm_matches_float64_reference():
  from flax import nnx
  x = np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32) * 30
  norm = RMSNorm(24, eps=1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  scale = np.linspace(0.5, 2.0, 24).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x64 = x.astype(np.float64)
  ref = scale * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=2e-6, atol=1e-6)


def test_kl_float64_closed_form():
  p = np.log(np.array([[0.5, 0.25, 0.25]]))
  q = np.log(np.array([[0.25, 0.5, 0.25]]))
  expected = 0.5 * np.log(2) + 0.25 * np.log(0.5)
  np.testing.assert_allclose(parity.kl_float64(p, q), [expected], rtol=1e-12)
  assert parity.kl_float64(p, p)[0] == 0.0


def test_top_p_sampling_distribution():
  """Nucleus filtering keeps exactly the top tokens whose mass reaches p."""
  from dihal_jax.backbone.generate import sample_next, top_p_filter
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.75)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  draws = jax.vmap(lambda k: sample_next(logits, k, 1.0, 0.75))(
      jax.random.split(jax.random.key(0), 4000))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  assert int(sample_next(logits, jax.random.key(1), 0.0, 1.0)[0]) == 0


def test_top_p_filter_equals_a_sorted_float64_nucleus():
  """The bisection keeps exactly the tokens a float64 sort-and-cumsum nucleus keeps."""
  from dihal_jax.backbone.generate import top_p_filter
  rng = np.random.default_rng(0)
  for scale, vocab, top_p in ((1.0, 1000, 0.9), (4.0, 5000, 0.5), (0.1, 300, 0.99),
                              (8.0, 50, 0.3)):
    logits = rng.normal(size=(6, vocab)) * scale
    x = logits - logits.max(-1, keepdims=True)
    probs = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(
        probs, order, -1)
    want = np.zeros_like(probs, bool)
    np.put_along_axis(want, order, before < top_p, -1)
    got = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), top_p)))
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(checkpoints, single_mesh):
  """bf16 matmuls with float32 accumulation: same argmax almost everywhere, small error."""
  path = checkpoints[("tiny_llama", 2)]
  tokens, mask = _batch(307, t=64)
  ref = np.asarray(load_model(path, mesh=single_mesh, rules=DEFAULT_RULES)(jnp.asarray(tokens)))
  model = load_model(path, mesh=single_mesh, rules=DEFAULT_RULES, dtype=jnp.bfloat16)
  assert model.lower(jnp.asarray(tokens), 2).dtype == jnp.bfloat16
  ours = np.asarray(model(jnp.asarray(tokens)))
  assert ours.dtype == np.float32  # logits are always float32
  rel = np.sqrt(np.mean((ours - ref) ** 2)) / ref.std()
  assert 0 < rel < 0.05
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
