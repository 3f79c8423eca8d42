"""Locate overhead: the full locate (streamed moments + reservoir + proxies) vs the bare forward.

What: on SmolLM2 and the Austen train split, the same pre-fetched batches go
(a) through the bare jitted forward that locate needs (embedding + blocks
1..L-1, every state emitted) and (b) through `locate.collect` plus the
proxies of every candidate layer. Goal: (b) / (a) <= 1.25, i.e. the geometry
adds at most a quarter to the forward. Both are timed after a warm-up
(compilation excluded).

Run:
  python benchmarks/locate.py [--num-tokens 16128] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx

from dihal_jax.backbone import checkpoint
from dihal_jax.data.dataset import Data
from dihal_jax.defaults import load_config_file
from dihal_jax.geometry import locate
from dihal_jax.parallel.sharding import mesh_and_rules
from dihal_jax.reports import write_json

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "smollm2_135m.py"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num-tokens", type=int, default=16128)
  parser.add_argument("--out")
  args = parser.parse_args()

  config = load_config_file(CONFIG_FILE)
  c = config.locate
  workdir = tempfile.mkdtemp()
  data = Data.from_config(config, workdir)
  model = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  mesh, rules = mesh_and_rules(config)
  candidates = locate.candidate_layers(c.layers, model.cfg.num_layers)
  num_batches = args.num_tokens // (c.batch_size * (data.window - 1))
  batches = list(itertools.islice(data.windows("train", batch_size=c.batch_size),
                                  num_batches + 1))
  layers = [0] + candidates

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, t: nnx.merge(graphdef, state).hidden_states(t, layers))
  jax.block_until_ready(forward(state, batches[-1]["tokens"]))  # compile
  start = time.perf_counter()
  for batch in batches[:num_batches]:
    jax.block_until_ready(forward(state, batch["tokens"]))
  forward_s = time.perf_counter() - start

  def run_locate(batches, n):
    moments, points, seen = locate.collect(model, batches, layers, num_batches=n,
                                           reservoir=c.reservoir, seed=config.seed, mesh=mesh,
                                           rules=rules, progress=False)
    key = jax.random.key(config.seed)
    pcfg = locate.proxy_config(config)
    reference = locate.pair_distances(points[0], moments[0], key, pcfg)
    for l in candidates:
      locate.layer_proxies(points[l], moments[l], reference, key, pcfg)
    return seen

  run_locate(batches[:3], 3)  # compile (the reservoir needs >= 2048 tokens)
  start = time.perf_counter()
  seen = run_locate(batches[:num_batches], num_batches)
  locate_s = time.perf_counter() - start

  ratio = locate_s / forward_s
  print(f"{seen} tokens, {len(candidates)} candidate layers: bare forward {forward_s:.1f} s, "
        f"locate {locate_s:.1f} s, ratio {ratio:.2f} (goal <= 1.25)")
  if args.out:
    write_json(args.out, {"num_tokens": seen, "forward_s": forward_s, "locate_s": locate_s,
                          "ratio": ratio, "devices": str(jax.devices())})


if __name__ == "__main__":
  main()
