"""Sharding: logical-axis rules, the mesh, and sharded == single-device numerics.

Runs on the 8 simulated CPU devices set up in conftest.py. Every model is
checked on four (data, fsdp, tensor) meshes against the same checkpoint loaded
on one device. The tiny presets have odd dims (60, 92, 307, ...) so many of
their parameters fall back to replicated; a third, "wide" in-test config with
dims divisible by 8 is sharded everywhere the rules say, so the comparison
cannot pass with everything silently replicated.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dihal_jax.backbone.checkpoint import random_hf_checkpoint
from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.convert import load_model
from dihal_jax.backbone.model import init_model
from dihal_jax.errors import UserInputError
from dihal_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec, make_mesh

RULES = DEFAULT_RULES
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
MODELS = ["tiny_llama", "tiny_qwen3", "wide_llama"]
ROWS, TOKENS = 8, 40
LENGTHS = [40, 33, 40, 1, 20, 39, 7, 26]  # right padding, one single-token row
SPLIT = 1  # lower/upper split layer
ATOL = 1e-5

# Every dim divisible by 8: fsdp=8 and tensor=4 shard every weight. Biases and a
# tied head so that every parameter kind and the tied logits einsum are sharded.
WIDE_HF = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
    hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=2048,
    tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    bos_token_id=1, eos_token_id=2)


def _mesh(shape):
  return make_mesh(dict(zip(MESH_AXES, shape)))


def _flat_params(model) -> dict[str, jax.Array]:
  return {"/".join(str(p) for p in path): var.get_value()
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _is_sharded(x: jax.Array) -> bool:
  return (any(s is not None for s in x.sharding.spec)
          and x.addressable_shards[0].data.shape != x.shape)


def _check_shard_shapes(params: dict[str, jax.Array], mesh):
  """Each param lives on the mesh and its shards have the shape its spec implies."""
  for name, x in params.items():
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh.shape == mesh.shape, name
    expected = []
    for dim, entry in zip(x.shape, tuple(x.sharding.spec) + (None,) * x.ndim):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      size = math.prod(mesh.shape[a] for a in axes)
      assert dim % size == 0, (name, x.shape, x.sharding.spec)
      expected.append(dim // size)
    assert len(x.addressable_shards) == mesh.size, name
    assert {s.data.shape for s in x.addressable_shards} == {tuple(expected)}, name


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
  wide = random_hf_checkpoint(WIDE_HF, tmp_path_factory.mktemp("wide_ckpt") / "wide_llama", 1)
  return dict(tiny_checkpoints, wide_llama=wide)


def _batch(vocab: int):
  rng = np.random.default_rng(0)
  mask = np.arange(TOKENS)[None, :] < np.asarray(LENGTHS)[:, None]
  tokens = np.where(mask, rng.integers(3, vocab, (ROWS, TOKENS)), 0).astype(np.int32)
  return tokens, mask


def _run(model, mesh):
  """One compile: logits, h_l for a few layers, and the lower/upper split, on `mesh`."""
  cfg = model.cfg
  layers = (SPLIT, cfg.num_layers)
  tokens, mask = _batch(cfg.vocab_size)
  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), RULES, mesh, tokens.shape))
  tokens = jax.device_put(tokens, batch_sharding)
  mask = jax.device_put(mask, batch_sharding)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, mask):
    m = nnx.merge(graphdef, state)
    hidden, logits = m.hidden_states(tokens, layers, mask=mask, with_logits=True)
    lower = m.lower(tokens, SPLIT, mask=mask)
    return dict(forward=m(tokens, mask=mask), logits=logits, lower=lower,
                upper=m.upper(lower, SPLIT, mask=mask),
                **{f"h{l}": hidden[l] for l in layers})

  out = jax.block_until_ready(forward(state, tokens, mask))
  return {k: np.asarray(v) for k, v in out.items()}, batch_sharding


@pytest.fixture(scope="module")
def reference(checkpoints):
  """name -> (params as numpy, outputs) of the checkpoint on a single device, made once."""
  cache = {}

  def get(name):
    if name not in cache:
      mesh = make_mesh({"data": 1})
      model = load_model(checkpoints[name], mesh=mesh, rules=RULES)
      params = {k: np.asarray(v) for k, v in _flat_params(model).items()}
      cache[name] = params, _run(model, mesh)[0]
    return cache[name]

  return get


# The wide model's exact specs: no divisibility fallback applies to it.
_WIDE_SPECS = {
    (8, 1, 1): {"embed": P(None, None), "layers/mlp/gate_proj": P(None, None, None),
                "layers/attn/k_proj": P(None, None, None, None)},
    (1, 8, 1): {"embed": P(None, "fsdp"), "layers/mlp/gate_proj": P(None, "fsdp", None),
                "layers/mlp/down_proj": P(None, None, "fsdp"),
                "layers/attn/k_proj": P(None, "fsdp", None, None)},
    (2, 2, 2): {"embed": P("tensor", "fsdp"), "layers/mlp/gate_proj": P(None, "fsdp", "tensor"),
                "layers/mlp/down_proj": P(None, "tensor", "fsdp"),
                "layers/attn/k_proj": P(None, "fsdp", "tensor", None),
                "layers/attn/o_proj": P(None, "tensor", None, "fsdp"),
                "layers/attn/q_bias": P(None, "tensor", None),
                "layers/mlp/up_bias": P(None, "tensor"),
                "layers/input_norm/scale": P(None, None)},
    (1, 2, 4): {"embed": P("tensor", "fsdp"), "layers/mlp/gate_proj": P(None, "fsdp", "tensor"),
                "layers/attn/q_proj": P(None, "fsdp", "tensor", None),
                "layers/attn/k_proj": P(None, "fsdp", "tensor", None),
                "layers/attn/v_bias": P(None, "tensor", None)},
}


_BATCH_SPECS = {(8, 1, 1): P("data", None), (1, 8, 1): P("fsdp", None),
                (2, 2, 2): P(("data", "fsdp"), None), (1, 2, 4): P("fsdp", None)}


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_sharded_forward_matches_single_device(name, shape, checkpoints, reference):
  ref_params, ref_out = reference(name)
  mesh = _mesh(shape)
  model = load_model(checkpoints[name], mesh=mesh, rules=RULES)
  params = _flat_params(model)

  # Parameters: born with the rules' shardings, bitwise the single-device values.
  _check_shard_shapes(params, mesh)
  assert params.keys() == ref_params.keys()
  for k, x in params.items():
    np.testing.assert_array_equal(np.asarray(x), ref_params[k], err_msg=k)
  sharded = sorted(k for k, x in params.items() if _is_sharded(x))
  if name == "wide_llama":
    for k, spec in _WIDE_SPECS[shape].items():
      assert params[k].sharding.spec == spec, (k, params[k].sharding.spec)
    if shape[1] > 1 or shape[2] > 1:  # every weight matrix is split
      weights = {k for k in params if k.endswith("_proj") or k in ("embed", "lm_head")}
      assert len(weights) == 8 and weights <= set(sharded), weights - set(sharded)
  elif shape in ((2, 2, 2), (1, 2, 4)):
    assert len(sharded) >= 4, sharded  # fsdp=2 divides d=60 / d=52
  else:  # (8,1,1): nothing to shard; (1,8,1): 60 and 52 are not divisible by 8
    assert not sharded, sharded

  out, batch_sharding = _run(model, mesh)
  assert batch_sharding.spec == _BATCH_SPECS[shape]
  for key, ref in ref_out.items():
    diff = float(np.abs(out[key] - ref).max())
    assert diff <= ATOL, f"{name} mesh {shape}: {key} max abs diff {diff}"
  # The DiHAL split itself: upper(lower(x, l), l) == forward(x) on the sharded mesh.
  np.testing.assert_allclose(out["upper"], out["forward"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["logits"], out["forward"], atol=ATOL, rtol=0)


# --- logical_to_spec -----------------------------------------------------------

def test_logical_to_spec_each_mesh_axis_used_once():
  mesh = _mesh((1, 2, 4))
  assert logical_to_spec(("embed", "embed"), RULES, mesh) == P("fsdp", None)
  assert logical_to_spec(("mlp", "q_heads"), RULES, mesh, (8, 8)) == P("tensor", None)
  # First dimension wins even when a later one would also be divisible.
  assert logical_to_spec(("vocab", "embed", "mlp"), RULES, mesh, (8, 8, 8)) == P(
      "tensor", "fsdp", None)
  # A tuple rule skips an axis already taken and keeps the rest.
  rules = (("a", "fsdp"), ("b", ("data", "fsdp")))
  assert logical_to_spec(("a", "b"), rules, _mesh((2, 2, 2)), (4, 4)) == P("fsdp", "data")


def test_logical_to_spec_replicates_indivisible_dims():
  mesh = _mesh((1, 2, 4))
  names = ("layers", "embed", "q_heads", "head_dim")
  assert logical_to_spec(names, RULES, mesh, (3, 60, 8, 10)) == P(None, "fsdp", "tensor", None)
  assert logical_to_spec(names, RULES, mesh, (3, 60, 6, 10)) == P(None, "fsdp", None, None)
  assert logical_to_spec(names, RULES, mesh, (3, 61, 6, 10)) == P(None, None, None, None)
  # Without a shape no divisibility check is possible.
  assert logical_to_spec(names, RULES, mesh) == P(None, "fsdp", "tensor", None)
  # A replicated dimension frees its axis for a later one.
  rules = (("x", "tensor"), ("y", "tensor"))
  assert logical_to_spec(("x", "y"), rules, mesh, (6, 8)) == P(None, "tensor")


def test_logical_to_spec_tuple_rules_and_unmapped_names():
  assert logical_to_spec(("batch", None), RULES, _mesh((2, 2, 2)), (8, 40)) == P(
      ("data", "fsdp"), None)
  assert logical_to_spec(("batch", None), RULES, _mesh((8, 1, 1)), (8, 40)) == P("data", None)
  # Size-1 mesh axes are dropped, so a one-axis tuple collapses to that axis.
  assert logical_to_spec(("batch", None), RULES, _mesh((1, 2, 4)), (8, 40)) == P("fsdp", None)
  assert logical_to_spec(("batch",), RULES, _mesh((1, 1, 8))) == P(None)
  # The tuple's total size must divide the dim, else the whole dim is replicated.
  assert logical_to_spec(("batch",), RULES, _mesh((2, 2, 2)), (6,)) == P(None)
  # Names without a rule, None names, and rules mapping to None are replicated.
  assert logical_to_spec(("unknown", None, "head_dim"), RULES, _mesh((2, 2, 2)), (8, 8, 8)) == P(
      None, None, None)


def test_make_mesh_shapes_and_errors():
  assert len(jax.devices()) == 8
  assert make_mesh({"data": -1}).shape == dict(data=8, fsdp=1, tensor=1)
  mesh = make_mesh({"fsdp": 2, "tensor": -1})
  assert mesh.axis_names == MESH_AXES and mesh.shape == dict(data=1, fsdp=2, tensor=4)
  single = make_mesh({"data": 1})
  assert single.size == 1 and single.devices.flat[0] == jax.devices()[0]
  with pytest.raises(UserInputError, match="-1"):
    make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(UserInputError, match="needs 16 devices"):
    make_mesh({"data": 4, "fsdp": 4})
  with pytest.raises(UserInputError, match="not divisible"):
    make_mesh({"data": -1, "tensor": 3})
  with pytest.raises(UserInputError, match="expected only"):
    make_mesh({"pipeline": 2})
  for bad in ({"data": 0}, {"data": -2}, {"data": 0, "fsdp": -1}):
    with pytest.raises(UserInputError, match="positive"):
      make_mesh(bad)


# --- init_model ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("hf", [WIDE_HF, "tiny_llama"], ids=["wide_llama", "tiny_llama"])
def test_init_model_params_are_born_sharded(hf):
  from conftest import load_config

  cfg = BackboneConfig.from_hf_config(
      load_config(hf).model.hf_config.to_dict() if isinstance(hf, str) else hf)
  mesh = _mesh((2, 2, 2))
  params = _flat_params(init_model(cfg, mesh=mesh, rules=RULES, seed=3))
  _check_shard_shapes(params, mesh)
  specs = {k: x.sharding.spec for k, x in params.items()}
  L = cfg.num_layers
  assert params["layers/mlp/gate_proj"].shape == (L, cfg.hidden_size, cfg.intermediate_size)
  assert specs["layers/mlp/gate_proj"] == P(None, "fsdp", "tensor")
  assert specs["layers/mlp/down_proj"] == P(None, "tensor", "fsdp")
  assert specs["layers/attn/q_proj"] == P(None, "fsdp", "tensor", None)
  assert specs["layers/attn/o_proj"] == P(None, "tensor", None, "fsdp")
  assert specs["layers/input_norm/scale"] == P(None, None)
  assert specs["final_norm/scale"] == P(None)
  if cfg.vocab_size % 2 == 0:
    assert specs["embed"] == P("tensor", "fsdp")
  else:  # 307 rows cannot be split over tensor=2
    assert specs["embed"] == P(None, "fsdp")
    assert specs["lm_head"] == P("fsdp", None)
  if hf is not WIDE_HF:
    return
  # Same seed on one device: the same values (sharding changes placement only).
  single = _flat_params(init_model(cfg, mesh=make_mesh({"data": 1}), rules=RULES, seed=3))
  for k, x in params.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(single[k]), err_msg=k)
