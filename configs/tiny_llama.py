"""Tiny random Llama with every Llama-3.1 feature: llama3 RoPE scaling, GQA, untied head.

Prime-ish dims ease shape tracing. No weights: parity builds a seeded random HF
model from `hf_config` and runs it through the normal conversion path.

  dihal parity --config=configs/tiny_llama.py --workdir=runs/tiny_llama
"""

from dihal_jax import defaults


def get_config():
  c = defaults.base()
  c.model.hf_config = dict(
      model_type="llama", vocab_size=307, hidden_size=60, intermediate_size=92,
      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
      hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=2048,
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                           low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64),
      bos_token_id=1, eos_token_id=2)
  c.parity.tokens = 300
  return c
