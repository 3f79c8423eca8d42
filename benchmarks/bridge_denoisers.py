"""Bridge denoisers side by side: train-step time and tokens/s of the UNet and the transformer.

What: the library's `make_train_step` (jitted, state donated, {"data": 1} mesh) for each
denoiser `dihal ablate` compares, on one [batch, length, d] batch of standardized states
(defaults 16 x 64 x SmolLM2-135M's 576) with random weights of the SmolLM2 architecture
(configs/smollm2_135m.py's hf_config; the speed does not depend on the values):
  unet                  UNetConfig(channels=128, self_condition=True) (the full preset's)
  transformer           4 blocks, self-conditioning, x0 prediction (the ablation's)
  transformer_token_ce  the same plus the auxiliary token loss over a V' = --classes head
Each is warmed up (compiled), then timed for --steps steps; the median is reported, with
the parameter count and tokens/s, and the ratio to the UNet in the same run.

Run:
  python benchmarks/bridge_denoisers.py --out results/bridge_ablation/denoiser_speed.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dihal_jax import reports  # noqa: E402
from dihal_jax.backbone.config import BackboneConfig  # noqa: E402
from dihal_jax.backbone.model import init_model  # noqa: E402
from dihal_jax.bridge import denoiser  # noqa: E402
from dihal_jax.bridge.normalization import Normalizer  # noqa: E402
from dihal_jax.bridge.train_step import (OptimConfig, init_train_state, make_optimizer,  # noqa: E402
                                         make_train_step)
from dihal_jax.defaults import load_config_file  # noqa: E402
from dihal_jax.parallel.sharding import DEFAULT_RULES, make_mesh  # noqa: E402

ROWS = {"unet": ("unet", 0.0), "transformer": ("transformer", 0.0),
        "transformer_token_ce": ("transformer", 0.1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--classes", type=int, default=12_000)
  parser.add_argument("--out", type=Path)
  args = parser.parse_args()
  config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "smollm2_135m.py")
  block_cfg = BackboneConfig.from_hf_config(config.model.hf_config.to_dict())
  mesh = make_mesh({"data": 1})
  backbone = init_model(block_cfg, mesh=mesh, rules=DEFAULT_RULES)
  d = block_cfg.hidden_size
  rng = np.random.default_rng(0)
  norm = Normalizer("per_channel", np.zeros(d, np.float32), np.ones(d, np.float32))
  head = {"means": rng.normal(size=(args.classes, d)).astype(np.float32),
          "class_of": (np.arange(block_cfg.vocab_size) % args.classes).astype(np.int32),
          "tau": np.float32(20.0)}
  x = rng.normal(size=(args.batch, args.length, d)).astype(np.float32)
  tokens = rng.integers(0, block_cfg.vocab_size, (args.batch, args.length))
  load = os.getloadavg()[0]
  out = {}
  for name, (kind, token_ce) in ROWS.items():
    bridge = config.bridge.to_dict()
    bridge.update(denoiser=kind, init="backbone")
    bridge["unet"]["self_condition"] = True
    model = denoiser.build(bridge, d, norm, seed=0, backbone=backbone, layer=1)
    optim = OptimConfig(total_steps=1000)
    state = init_train_state(model, make_optimizer(optim))
    step = make_train_step(denoiser.diffusion_config(bridge), optim, mesh, DEFAULT_RULES,
                           token_ce=token_ce, token_head=head if token_ce else None)
    key = jax.random.key(0)
    state, metrics = step(state, x, key, tokens=tokens)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      tick = time.perf_counter()
      state, metrics = step(state, x, key, tokens=tokens)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    out[name] = {"params": denoiser.num_params(model), "step_s": median, "min_step_s": min(times),
                 "tokens_per_s": args.batch * args.length / median}
  for row in out.values():
    row["time_vs_unet"] = row["step_s"] / out["unet"]["step_s"]
  report = {"rows": out, "batch": args.batch, "length": args.length, "dim": d,
            "steps": args.steps, "devices": str(jax.devices()), "jax": jax.__version__,
            "load_before": load, "load_after": os.getloadavg()[0]}
  table = [[n, f"{r['params']:,}", f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['time_vs_unet']:.2f}x"] for n, r in out.items()]
  print(reports.markdown_table(["denoiser", "params", "step (s, median)", "tokens/s",
                                "time vs UNet"], table))
  print(f"1-min load average before/after: {report['load_before']:.2f} / "
        f"{report['load_after']:.2f}")
  if args.out:
    reports.write_json(args.out, report)


if __name__ == "__main__":
  main()
