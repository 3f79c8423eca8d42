"""Tiny random Qwen3: q/k RMSNorm, GQA, explicit head_dim != hidden/heads, tied head.

  dihal parity --config=configs/tiny_qwen3.py --workdir=runs/tiny_qwen3
"""

from dihal_jax import defaults


def get_config():
  c = defaults.base()
  c.model.hf_config = dict(
      model_type="qwen3", vocab_size=311, hidden_size=52, intermediate_size=84,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=14,
      hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=2048,
      tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
      bos_token_id=1, eos_token_id=2)
  c.parity.tokens = 300
  return c
