"""`dihal sample --method=mdm`: text from the masked diffusion model into samples.jsonl.

The same templates as the bridge's `dihal sample` (separator at position 0, a `--prompt`
prefix, `--infill` text whose `[___]` gaps become `sample.gap` unknown positions each);
the unknown positions are revealed by mdm/sampler.py in `sample.mdm_steps` steps
(`sample.unmask`, `sample.mdm_block`, `sample.temperature`, `sample.top_p`), in batches
of `sample.batch`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dihal_jax import reports
from dihal_jax.backbone import checkpoint
from dihal_jax.errors import UserInputError
from dihal_jax.hybrid.sample import infill_template
from dihal_jax.mdm import sampler
from dihal_jax.mdm.train import load_mdm


def run_sample(config: ml_collections.ConfigDict, workdir: str | Path, *, prompt: str = "",
               infill: str = "", progress: bool = True) -> dict:
  workdir = Path(workdir)
  s = config.sample
  if s.num < 1:
    raise UserInputError(f"--config.sample.num={s.num}: expected >= 1")
  if prompt and infill:
    raise UserInputError("--prompt and --infill: give one of them")
  mdm = load_mdm(config, workdir)
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  tokenizer = checkpoint.load_tokenizer(ckpt)
  if tokenizer is None:
    raise UserInputError(f"{ckpt}: the checkpoint has no tokenizer; sample needs text")
  separator = checkpoint.separator_id(tokenizer, config)
  length = s.length or config.data.window
  if infill:
    row, known_row = infill_template(infill, tokenizer, separator, s.gap, 1)
  else:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if len(ids) + 1 >= length:
      raise UserInputError(f"--prompt: {len(ids)} tokens leave nothing to generate in "
                           f"sample.length={length}")
    row = np.full(length, separator, np.int32)
    row[1:1 + len(ids)] = ids
    known_row = np.arange(length) < 1 + len(ids)
  tokens, known = np.tile(row, (s.num, 1)), np.tile(known_row, (s.num, 1))
  out = []
  for i in tqdm(range(0, s.num, s.batch), desc="sample (mdm)", disable=not progress):
    out.append(sampler.sample(mdm.model, tokens[i:i + s.batch], known[i:i + s.batch],
                              jax.random.fold_in(jax.random.key(config.seed), i),
                              mask_id=mdm.mask_id, shift=mdm.shift, steps=s.mdm_steps,
                              unmask=s.unmask, block=s.mdm_block, trained_block=mdm.block,
                              temperature=s.temperature,
                              top_p=s.top_p))
  generated = np.concatenate(out)
  condition = {"prompt": prompt} if prompt else ({"infill": infill} if infill else {})
  lines = [json.dumps({"text": tokenizer.decode(r[1:].tolist()), "tokens": r.tolist(),
                       "method": "mdm", **condition}) for r in generated]
  reports.write_text(workdir / "samples.jsonl", "\n".join(lines) + "\n")
  return {"samples": str(workdir / "samples.jsonl"), "num": int(len(generated)),
          "length": int(generated.shape[1]), "readout": f"mdm, {s.unmask}", "mdm_step": mdm.step,
          "steps": s.mdm_steps, **condition,
          "preview": [tokenizer.decode(r[1:].tolist()) for r in generated[:3]]}
