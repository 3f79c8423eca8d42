"""From a config's `model` section to a loaded backbone.

`model.checkpoint` names a local HF directory or the embedded SmolLM2. Presets
without weights (tiny test models) get a seeded random HF checkpoint written
by `transformers` into the workdir, so they go through the very same
safetensors conversion path and can be compared with torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dihal_jax.backbone.config import BackboneConfig
from dihal_jax.backbone.convert import compare_checkpoints, load_model, save_hf_checkpoint
from dihal_jax.backbone.embedded import resolve_checkpoint
from dihal_jax.backbone.model import Decoder
from dihal_jax.errors import UserInputError
from dihal_jax.files import publish_dir
from dihal_jax.parallel.sharding import mesh_and_rules


def random_hf_checkpoint(hf_config: dict, out_dir: Path, seed: int) -> Path:
  """Writes a seeded random `transformers` model for `hf_config` (weightless presets)."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  BackboneConfig.from_hf_config(hf_config)  # fail on unsupported fields before torch does
  if (out_dir / "config.json").is_file():
    return out_dir
  fields = dict(hf_config)
  config = AutoConfig.for_model(fields.pop("model_type"), **fields)
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: perturb all of them
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    model.save_pretrained(tmp)
    if config.vocab_size >= len(SPECIAL_TOKENS) + 256:
      byte_tokenizer().save_pretrained(tmp)
    return publish_dir(tmp, out_dir, "config.json")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's ids 0, 1, 2


def byte_tokenizer():
  """A byte-level tokenizer (3 special tokens + 256 bytes, no merges) for random presets,
  so that tiny models run the whole text pipeline."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[1],
                                 eos_token=SPECIAL_TOKENS[2], unk_token=None,
                                 pad_token=SPECIAL_TOKENS[2])


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
  """The HF checkpoint directory the config names (made for weightless presets)."""
  if config.model.checkpoint:
    return resolve_checkpoint(config.model.checkpoint)
  hf_config = config.model.hf_config.to_dict()
  if not hf_config:
    raise UserInputError("config: model.checkpoint is empty and model.hf_config is not set")
  return random_hf_checkpoint(hf_config, Path(workdir) / "random_hf_checkpoint", config.seed)


def backbone_config(config: ml_collections.ConfigDict) -> BackboneConfig:
  """The architecture, without touching weights (works for every preset)."""
  if config.model.checkpoint:
    path = resolve_checkpoint(config.model.checkpoint) / "config.json"
    return BackboneConfig.from_hf_config(json.loads(path.read_text()))
  return BackboneConfig.from_hf_config(config.model.hf_config.to_dict())


def load_backbone(config: ml_collections.ConfigDict, ckpt_dir: Path) -> Decoder:
  """Loads `ckpt_dir` onto the config's mesh with its dtypes and attention kernel."""
  mesh, rules = mesh_and_rules(config)
  return load_model(ckpt_dir, mesh=mesh, rules=rules,
                    dtype=jnp.dtype(config.model.dtype),
                    param_dtype=jnp.dtype(config.model.param_dtype),
                    attention=config.model.attention)


def load_tokenizer(ckpt_dir: Path):
  """The checkpoint's HF tokenizer, or None when it has none (random presets)."""
  if not (ckpt_dir / "tokenizer.json").is_file() and not (ckpt_dir / "tokenizer_config.json").is_file():
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(ckpt_dir))


def separator_id(tokenizer, config: ml_collections.ConfigDict) -> int:
  """Id of the document separator (config `model.separator`, else the tokenizer's BOS)."""
  token_id = tokenizer.convert_tokens_to_ids(config.model.separator)
  if token_id is None or token_id == tokenizer.unk_token_id:
    token_id = tokenizer.bos_token_id
  return int(token_id)


def convert_and_export(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """`dihal convert`: HF -> sharded JAX params -> HF again, checked bit for bit."""
  t0 = time.perf_counter()
  ckpt = checkpoint_dir(config, workdir)
  model = load_backbone(config, ckpt)
  load_s = time.perf_counter() - t0
  tokenizer_files = [p for p in sorted(ckpt.iterdir()) if p.name.startswith("tokenizer")]
  t0 = time.perf_counter()
  out = save_hf_checkpoint(model, Path(workdir) / "hf",
                           max_shard_bytes=int(config.convert.max_shard_gb * 2**30),
                           dtype=config.convert.dtype or None, extra_files=tuple(tokenizer_files))
  export_s = time.perf_counter() - t0
  roundtrip = compare_checkpoints(ckpt, out)
  shardings = {"/".join(map(str, k)): str(v.get_value().sharding.spec)
               for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return {"source": str(ckpt), "exported": str(out), "num_params": model.cfg.num_params,
          "devices": jax.device_count(), "mesh": config.mesh.to_dict(),
          "shardings": shardings, "roundtrip": roundtrip,
          "timings": {"load_s": load_s, "export_s": export_s}}

