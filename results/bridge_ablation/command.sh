#!/bin/bash
# The committed bridge ablation (results/bridge_ablation): resumable, rerun the same command.
# Extra arguments are passed on (entropy_matched/command.sh adds its rows and β ladder).
cd "$(dirname "$0")/../.."
exec python -m dihal_jax.cli ablate --config=configs/smollm2_135m.py \
  --workdir=runs/bridge_ablation --config.bridge.layer=1 \
  --config.train.steps=800 --config.train.warmup_steps=80 --config.train.lr=1e-3 \
  --config.train.cache_windows=8192 --config.train.val_windows=256 \
  --config.train.checkpoint_every=200 --config.train.val_every=200 --config.train.token_ce=0.1 \
  --config.bridge.unet.self_condition=True --config.sample.steps=50 --config.eval.num=128 \
  --config.sample.batch=32 "--config.eval.noise_levels=(0.3,)" "$@"
