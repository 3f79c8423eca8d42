"""Llama-3.1-8B-Instruct: hyperparameters of meta-llama/Llama-3.1-8B-Instruct config.json.

No weights ship with the project: point `--config.model.checkpoint=DIR` at a
local download of the HF checkpoint (safetensors + index). Without one the
architecture alone serves planning (`jax.eval_shape`, AOT compile).

  dihal parity --config=configs/llama3_1_8b_instruct.py --config.model.checkpoint=DIR --workdir=W
"""

from dihal_jax import defaults


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
  return c
