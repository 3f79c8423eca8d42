"""Data pipeline throughput vs the backbone forward, on the same machine, in one run.

What: tokens/s of the grain window pipeline (tokenize with SmolLM2's tokenizer,
pack into windows, shuffle, batch) over the Austen train split, against
tokens/s of the jitted SmolLM2 forward on batches of the same shape.
Why: the pipeline must never be the bottleneck; the goal is a ratio >= 20.

Run:
  python benchmarks/data_pipeline.py [--window 64] [--batch 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dihal_jax.backbone import checkpoint
from dihal_jax.data.dataset import Data
from dihal_jax.defaults import load_config_file
from dihal_jax.reports import write_json

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "smollm2_135m.py"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--window", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--pipeline-batches", type=int, default=300)
  parser.add_argument("--forward-repeats", type=int, default=5)
  parser.add_argument("--out")
  args = parser.parse_args()

  config = load_config_file(CONFIG_FILE)
  config.data.window = args.window
  workdir = tempfile.mkdtemp()
  data = Data.from_config(config, workdir)
  it = iter(data.windows("train", batch_size=args.batch))
  next(it)  # start-up (threads, first tokenization) is not throughput
  start = time.perf_counter()
  batches = [next(it)["tokens"] for _ in range(args.pipeline_batches)]
  pipeline_s = time.perf_counter() - start
  pipeline_tps = args.pipeline_batches * args.batch * args.window / pipeline_s

  model = checkpoint.load_backbone(config, checkpoint.checkpoint_dir(config, workdir))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  tokens = jnp.asarray(batches[0])
  forward(state, tokens).block_until_ready()
  times = []
  for i in range(args.forward_repeats):
    start = time.perf_counter()
    forward(state, jnp.asarray(batches[i + 1])).block_until_ready()
    times.append(time.perf_counter() - start)
  forward_tps = args.batch * args.window / statistics.median(times)

  ratio = pipeline_tps / forward_tps
  print(f"window {args.window}, batch {args.batch}: pipeline {pipeline_tps:,.0f} tokens/s, "
        f"SmolLM2 forward {forward_tps:,.0f} tokens/s, ratio {ratio:.0f} (goal >= 20)")
  if args.out:
    write_json(args.out, {"pipeline_tokens_per_s": pipeline_tps,
                          "forward_tokens_per_s": forward_tps, "ratio": ratio,
                          "window": args.window, "batch": args.batch,
                          "devices": str(jax.devices())})


if __name__ == "__main__":
  main()
