#!/bin/bash
# The full run's `mdm` rows (results/full/mdm): the full preset's overrides, the backbone
# post-trained into a masked diffusion model at the preset's MDM budget (300 steps x 8 windows),
# judged beside real_text and the calibration samplers with the committed full run's seed, sets
# and 128 samples per row; random reveal order, then confidence order on the same MDM.
# Resumable (the MDM's checkpoints): rerun the same command.
set -e
cd "$(dirname "$0")/../../.."
FULL="--config.train.steps=3000 --config.train.warmup_steps=200 --config.train.checkpoint_every=500 \
 --config.train.val_every=250 --config.train.cache_windows=8192 --config.train.val_windows=256 \
 --config.train.lr=1e-3 --config.bridge.unet.self_condition=True --config.sample.steps=50 \
 --config.sample.batch=32 --config.mdm.steps=300 --config.mdm.batch_size=8 --config.mdm.warmup_steps=30 \
 --config.mdm.checkpoint_every=50 --config.mdm.val_every=50 --config.eval.num=128"
python -m dihal_jax.cli eval --config=configs/smollm2_135m.py $FULL \
  --config.eval.methods=real_text,unigram_sampler,bigram_sampler,mdm --config.sample.unmask=random \
  --workdir=runs/full_mdm/random
mkdir -p runs/full_mdm/confidence
ln -sfn ../random/mdm runs/full_mdm/confidence/mdm
python -m dihal_jax.cli eval --config=configs/smollm2_135m.py $FULL \
  --config.eval.methods=real_text,mdm --config.sample.unmask=confidence \
  --workdir=runs/full_mdm/confidence
