"""`dihal sample`: text from the trained bridge through the frozen upper layers.

Flow: load the bridge of `workdir` (EMA params) and the backbone -> build the
token template (separator at position 0; a `--prompt` prefix; `--infill`
text whose `[___]` gaps become `sample.gap` unknown positions each) -> fill
the unknown positions with the configured readout (hybrid/readout.py), in
batches of `sample.batch` -> detokenize into `workdir/samples.jsonl`, one
JSON object per sample ({"text", "tokens", "readout", "prompt" | "infill"}).

Usage:
  dihal sample --config=configs/smollm2_135m.py --workdir=W --num=16 --readout=blockwise
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
from dihal_jax.parallel.sharding import mesh_and_rules
from dihal_jax.hybrid.bridge_sampler import TrainedBridge, load_bridge
from dihal_jax.bridge.token_head import ClassMeanHead
from dihal_jax.hybrid.readout import Readout, ReadoutConfig
from dihal_jax.hybrid.tolerant_decoder import readout_backbone

GAP = "[___]"


def readout_config(config: ml_collections.ConfigDict, steps: int | None = None) -> ReadoutConfig:
  s = config.sample
  return ReadoutConfig(temperature=s.temperature, top_p=s.top_p, block=s.block,
                       rounds=s.rounds, renoise_t=s.renoise_t, steps=steps or s.steps,
                       beta=s.beta)


def current_token_head(bridge: TrainedBridge, vocab_size: int) -> ClassMeanHead:
  """The current-token head (identity / joint readouts) fit on the bridge's own training cache,
  in its normalized space."""
  cache = Path(bridge.train_cache or "")
  states = cache / f"layer_{bridge.layer}.npy"
  if not states.is_file():
    raise UserInputError(f"current-token head: the bridge's training cache {cache} is missing "
                         "(re-run `dihal train` on this machine to rebuild it)")
  return ClassMeanHead.fit(np.load(cache / "tokens.npy"), np.load(states, mmap_mode="r"),
                           bridge.norm, vocab_size=vocab_size)


def infill_template(text: str, tokenizer, separator: int, gap: int, factor: int):
  """(tokens [T], known [T]) for text with [___] gaps; T padded up to a multiple of `factor`
  with unknown positions (generated as a continuation)."""
  if GAP not in text:
    raise UserInputError(f"--infill: the text has no {GAP} gap to fill")
  tokens, known = [separator], [True]
  for i, part in enumerate(text.split(GAP)):
    if i:
      tokens += [separator] * gap
      known += [False] * gap
    ids = tokenizer(part, add_special_tokens=False)["input_ids"]
    tokens += ids
    known += [True] * len(ids)
  pad = -len(tokens) % factor
  return np.array(tokens + [separator] * pad, np.int32), np.array(known + [False] * pad, bool)


def run_sample(config: ml_collections.ConfigDict, workdir: str | Path, *, prompt: str = "",
               infill: str = "", progress: bool = True) -> dict:
  workdir = Path(workdir)
  s = config.sample
  mesh = mesh_and_rules(config)[0]
  bridge = load_bridge(workdir, mesh, kind=config.bridge.denoiser)
  ckpt = checkpoint.checkpoint_dir(config, workdir)
  tokenizer = checkpoint.load_tokenizer(ckpt)
  if tokenizer is None:
    raise UserInputError(f"{ckpt}: the checkpoint has no tokenizer; sample needs text")
  backbone = checkpoint.load_backbone(config, ckpt)
  reader = Readout(readout_backbone(workdir, backbone, mesh), bridge.layer,
                   checkpoint.separator_id(tokenizer, config))
  length = s.length or config.data.window
  if s.num < 1:
    raise UserInputError(f"sample.num={s.num}: expected >= 1")
  if prompt and infill:
    raise UserInputError("--prompt and --infill: give one of them")
  if infill:
    row, known_row = infill_template(infill, tokenizer, reader.separator, s.gap, bridge.factor)
    tokens, known = np.tile(row, (s.num, 1)), np.tile(known_row, (s.num, 1))
  else:
    if length % bridge.factor:
      raise UserInputError(f"length={length}: must be a multiple of {bridge.factor} (the "
                           "bridge UNet's downsampling)")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    tokens, known = reader.template(s.num, length, ids)
  cfg = readout_config(config)
  head = (current_token_head(bridge, backbone.cfg.vocab_size)
          if s.readout in ("identity", "joint") else None)
  out_tokens = []
  for i in tqdm(range(0, s.num, s.batch), desc=f"sample ({s.readout})", disable=not progress):
    out = reader.fill(bridge, jax.random.fold_in(jax.random.key(config.seed), i),
                      tokens[i:i + s.batch], known[i:i + s.batch], mode=s.readout, cfg=cfg,
                      identity_head=head)
    out_tokens.append(np.asarray(out["tokens"]))
  generated = np.concatenate(out_tokens)
  condition = {"prompt": prompt} if prompt else ({"infill": infill} if infill else {})
  lines = [json.dumps({"text": tokenizer.decode(row[1:].tolist()), "tokens": row.tolist(),
                       "readout": s.readout, **condition}) for row in generated]
  reports.write_text(workdir / "samples.jsonl", "\n".join(lines) + "\n")
  return {"samples": str(workdir / "samples.jsonl"), "num": int(len(generated)),
          "length": int(generated.shape[1]), "readout": s.readout, "layer": bridge.layer,
          "bridge_step": bridge.step, **condition,
          "preview": [tokenizer.decode(row[1:].tolist()) for row in generated[:3]]}
