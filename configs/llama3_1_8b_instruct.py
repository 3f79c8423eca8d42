"""Llama-3.1-8B-Instruct: hyperparameters of meta-llama/Llama-3.1-8B-Instruct config.json.

No weights ship with the project: point `--config.model.checkpoint=DIR` at a
local download of the HF checkpoint (safetensors + index). Without one the
architecture alone serves planning (`jax.eval_shape`, AOT compile).

  dihal parity --config=configs/llama3_1_8b_instruct.py --config.model.checkpoint=DIR --workdir=W
"""

from dihal_jax import defaults

# `dihal plan` meshes (data, fsdp, tensor) per topology. FSDP over every chip that the fast
# interconnect links (a TPU slice, v5e-16 and v4-32 included, spans its hosts by ICI; an H100
# node by NVLink), data parallelism only across H100 nodes, whose network is ~10x slower.
# The backbone is frozen: FSDP only buys memory (16 GB of bf16 weights do not fit a 16 GiB
# v5e chip), and at DiHAL's small batches XLA keeps the weight shards in place and moves the
# (smaller) activations instead of gathering weights (seen in the HLO compiled by
# `dihal plan --compile`). Tensor = 1: it would cut the bridge's
# data parallelism (batch goes over data x fsdp) for no memory DiHAL needs; 8 KV heads cap it
# at 8 anyway. `dihal plan` shows the result and suggests another mesh when one does not fit.
MESH_PRESETS = dict(
    v5e_8=dict(data=1, fsdp=8, tensor=1), v5e_16=dict(data=1, fsdp=16, tensor=1),
    v4_32=dict(data=1, fsdp=16, tensor=1), v5p_8=dict(data=1, fsdp=4, tensor=1),
    h100x8=dict(data=1, fsdp=8, tensor=1), h100x16=dict(data=2, fsdp=8, tensor=1))


def get_config():
  c = defaults.base()
  c.model.hf_config = dict(
      model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
      hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072,
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype="bfloat16",
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
      rope_theta=500000.0,
      bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
  c.model.separator = "<|begin_of_text|>"  # Llama 3's document start token
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.mesh_presets = MESH_PRESETS
  return c
