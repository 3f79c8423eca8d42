#!/bin/bash
# The bridge ablation's two leading rows and unet_logit_normal judged at matched entropy (results/bridge_ablation/
# entropy_matched): the same bridges and protocol as ../command.sh, read by `joint` at every β of
# ablate.betas with T bisected to real text's entropy. Resumable: rerun the same command.
cd "$(dirname "$0")/../../.."
exec python -m dihal_jax.cli ablate --config=configs/smollm2_135m.py \
  --workdir=runs/bridge_ablation --config.bridge.layer=1 \
  --config.train.steps=800 --config.train.warmup_steps=80 --config.train.lr=1e-3 \
  --config.train.cache_windows=8192 --config.train.val_windows=256 \
  --config.train.checkpoint_every=200 --config.train.val_every=200 --config.train.token_ce=0.1 \
  --config.bridge.unet.self_condition=True --config.sample.steps=50 --config.eval.num=128 \
  --config.sample.batch=32 "--config.eval.noise_levels=(0.3,)" \
  --config.ablate.rows=unet_scratch,transformer_backbone,unet_logit_normal "--config.ablate.betas=(1.0,0.3,0.1)"
