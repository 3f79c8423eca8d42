"""Qwen3-8B: hyperparameters of Qwen/Qwen3-8B config.json (q/k norm, untied head).

  dihal parity --config=configs/qwen3_8b.py --config.model.checkpoint=DIR --workdir=W
"""

from dihal_jax import defaults

# `dihal plan` meshes per topology, for the reasons given in configs/llama3_1_8b_instruct.py
# (same shape class: 16.4 GB of bf16 weights, 8 KV heads).
MESH_PRESETS = dict(
    v5e_8=dict(data=1, fsdp=8, tensor=1), v5e_16=dict(data=1, fsdp=16, tensor=1),
    v4_32=dict(data=1, fsdp=16, tensor=1), v5p_8=dict(data=1, fsdp=4, tensor=1),
    h100x8=dict(data=1, fsdp=8, tensor=1), h100x16=dict(data=2, fsdp=8, tensor=1))


def get_config():
  c = defaults.base()
  c.model.hf_config = dict(
      model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
      hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=40960,
      tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
      rope_theta=1000000.0, dtype="bfloat16",
      bos_token_id=151643, eos_token_id=151645)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.mesh_presets = MESH_PRESETS
  return c
