"""`dihal sample --method=dglm [--attribute NAME=VALUE[+...]] [--prompt TEXT]`: continuations
from a trained DGLM workdir, optionally steered toward attribute values.

The prompt (empty: the separator alone) gives the prefix latent; the latent denoiser
proposes a continuation latent (classifier guidance of strength dglm.scale toward the
attribute), the projector turns it into the soft prompt, the backbone writes
sample.length tokens (0 = dglm.continuation) with sample.temperature / sample.top_p.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dihal_jax import reports
from dihal_jax.backbone import checkpoint
from dihal_jax.data.dataset import cache_root
from dihal_jax.dglm import latent_diffusion, soft_prompt
from dihal_jax.dglm.attributes import parse_target, target_name
from dihal_jax.dglm.trained import attribute_values, diffusion_config, load_dglm
from dihal_jax.errors import UserInputError
from dihal_jax.eval.encoder import SentenceEncoder


def run_sample(config: ml_collections.ConfigDict, workdir: str | Path, *, prompt: str = "",
               infill: str = "", progress: bool = True) -> dict:
  del progress  # one jitted call per stage
  workdir = Path(workdir)
  s, d = config.sample, config.dglm
  if infill:
    raise UserInputError("--infill: DGLM continues a prompt; use --prompt")
  if s.num < 1:
    raise UserInputError(f"--config.sample.num={s.num}: expected >= 1")
  if d.scale < 0:
    raise UserInputError(f"--config.dglm.scale={d.scale}: expected >= 0")
  values = attribute_values(d)
  target = parse_target(s.attribute, values) if s.attribute else ()
  encoder = SentenceEncoder(config.eval.encoder, cache_root(config))
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  tokenizer = checkpoint.load_tokenizer(ckpt)
  if tokenizer is None:
    raise UserInputError(f"{ckpt}: the checkpoint has no tokenizer; sample needs text")
  backbone = checkpoint.load_backbone(config, ckpt)
  model = load_dglm(config, workdir, backbone)
  separator = checkpoint.separator_id(tokenizer, config)
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
  prompts = np.tile(np.asarray([separator] + ids, np.int32), (s.num, 1))
  prefix_latent = jnp.asarray(np.tile(encoder([prompt]), (s.num, 1)))
  key = jax.random.key(config.seed)
  latent = latent_diffusion.propose(
      model.denoiser, prefix_latent, jax.random.fold_in(key, 1), diffusion_config(d),
      steer=[(model.classifiers[a], v) for a, v in target], scale=d.scale if target else 0.0)
  out = np.asarray(soft_prompt.write(backbone, model.projector, prompts, latent,
                                     length=s.length or d.continuation, key=key,
                                     temperature=s.temperature, top_p=s.top_p))
  texts = tokenizer.batch_decode(out)
  condition = {"prompt": prompt} if prompt else {}
  if target:
    condition["attribute"] = target_name(target, values)
  lines = [json.dumps({"text": t, "tokens": r.tolist(), "method": "dglm", **condition})
           for t, r in zip(texts, out)]
  reports.write_text(workdir / "samples.jsonl", "\n".join(lines) + "\n")
  return {"samples": str(workdir / "samples.jsonl"), "num": int(len(out)),
          "length": int(out.shape[1]), "readout": "dglm" + (f", {condition['attribute']}"
                                                          if target else ""),
          "scale": d.scale if target else 0.0, **condition, "preview": texts[:3]}
