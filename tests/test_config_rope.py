"""HF config parsing and RoPE against transformers' own implementation."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import REPO, load_config
from dihal_jax.backbone import rope
from dihal_jax.backbone.config import BackboneConfig, Llama3RopeScaling

LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def _llama_hf(**overrides):
  hf = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, max_position_embeddings=131072, hidden_act="silu")
  hf.update(overrides)
  return hf


def test_rope_parameters_and_legacy_rope_scaling_forms_agree():
  new = BackboneConfig.from_hf_config(_llama_hf(rope_parameters=dict(LLAMA31_ROPE,
                                                                     rope_theta=5e5)))
  old = BackboneConfig.from_hf_config(_llama_hf(rope_scaling=dict(LLAMA31_ROPE), rope_theta=5e5))
  legacy_type_key = dict(LLAMA31_ROPE)
  legacy_type_key["type"] = legacy_type_key.pop("rope_type")
  older = BackboneConfig.from_hf_config(_llama_hf(rope_scaling=legacy_type_key, rope_theta=5e5))
  assert new == old == older
  assert new.rope_theta == 5e5
  assert new.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
  assert new.head_dim == 16  # hidden / heads when head_dim is absent


def test_config_roundtrips_through_to_hf_config():
  for name in ("tiny_llama", "tiny_qwen3", "llama3_1_8b_instruct", "qwen3_8b"):
    cfg = BackboneConfig.from_hf_config(load_config(name).model.hf_config.to_dict())
    assert BackboneConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_published_8b_parameter_counts():
  llama = BackboneConfig.from_hf_config(load_config("llama3_1_8b_instruct").model.hf_config.to_dict())
  qwen = BackboneConfig.from_hf_config(load_config("qwen3_8b").model.hf_config.to_dict())
  # Published totals: Llama-3.1-8B 8,030,261,248; Qwen3-8B 8.19B (8,190,735,360).
  assert llama.num_params == 8_030_261_248
  assert qwen.num_params == 8_190_735_360
  assert qwen.qk_norm and not qwen.tie_word_embeddings and llama.rope_scaling is not None


def test_num_params_matches_torch_model(tiny_checkpoints):
  from transformers import AutoModelForCausalLM
  for name, path in tiny_checkpoints.items():
    cfg = BackboneConfig.from_hf_config(load_config(name).model.hf_config.to_dict())
    torch_model = AutoModelForCausalLM.from_pretrained(str(path))
    unique = {p.data_ptr(): p.numel() for p in torch_model.parameters()}
    assert cfg.num_params == sum(unique.values()), name


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(LLAMA31_ROPE, rope_theta=500000.0),
    dict(LLAMA31_ROPE, rope_theta=500000.0, original_max_position_embeddings=64),
])
def test_inverse_frequencies_match_transformers(rope_parameters):
  hf = _llama_hf(rope_parameters=rope_parameters, head_dim=128)
  torch_rope = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in hf.items()
                                                   if k != "model_type"}))
  ours = rope.inverse_frequencies(BackboneConfig.from_hf_config(hf))
  assert torch_rope.attention_scaling == 1.0
  np.testing.assert_allclose(ours, torch_rope.inv_freq.numpy(), rtol=1e-6, atol=0)


def test_llama3_scaling_closed_form():
  """High frequencies untouched, low ones divided by `factor` (Llama 3.1 paper rule)."""
  cfg = BackboneConfig.from_hf_config(_llama_hf(rope_parameters=dict(LLAMA31_ROPE, rope_theta=5e5),
                                                head_dim=128))
  scaled = rope.inverse_frequencies(cfg)
  plain = (1.0 / 5e5 ** (np.arange(0, 128, 2) / 128)).astype(np.float64)
  wavelen = 2 * math.pi / plain
  high = wavelen < 8192 / 4.0
  low = wavelen > 8192 / 1.0
  np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
  assert high.any() and low.any()


def test_apply_rotary_matches_transformers():
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 300, 3, 16
  x = rng.standard_normal((b, t, n, h)).astype(np.float32)
  positions = np.broadcast_to(np.arange(t), (b, t))
  inv = (1.0 / 1e4 ** (np.arange(0, h, 2) / h)).astype(np.float32)
  cos, sin = rope.rotary_cos_sin(positions, inv)
  ours = np.asarray(rope.apply_rotary(x, cos, sin))
  xt = torch.from_numpy(x).transpose(1, 2)  # HF layout [B, N, T, H]
  ref, _ = apply_rotary_pos_emb(xt, xt, torch.tensor(np.asarray(cos)),
                                torch.tensor(np.asarray(sin)))
  np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=2e-5)


def test_every_config_file_loads_and_parses():
  names = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
  assert {"smollm2_135m", "tiny_llama", "tiny_qwen3", "llama3_1_8b_instruct", "qwen3_8b"} <= set(names)
  for name in names:
    config = load_config(name)
    BackboneConfig.from_hf_config(config.model.hf_config.to_dict())
    assert config.mesh.to_dict().keys() <= {"data", "fsdp", "tensor"}


def test_embedded_smollm2_preset_matches_its_published_config():
  cfg = BackboneConfig.from_hf_config(load_config("smollm2_135m").model.hf_config.to_dict())
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert cfg.tie_word_embeddings and cfg.num_params == 134_515_008
