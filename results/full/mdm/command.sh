#!/bin/bash
# The masked diffusion row of the full run (results/full/mdm): the full preset's eval settings
# (128 samples per row, the same evaluation windows as results/full, whose real_text row
# must match) with the full preset's MDM budget: SmolLM2-135M post-trained for 300 steps x
# 8 windows x 64 tokens (154k tokens), sampled in random order with 32 reveal steps.
# Resumable: rerun the same command.
cd "$(dirname "$0")/../../.."
exec python -m dihal_jax.cli eval --config=configs/smollm2_135m.py --workdir=runs/full_mdm/random \
  --config.train.steps=3000 --config.train.warmup_steps=200 --config.train.checkpoint_every=500 \
  --config.train.val_every=250 --config.train.cache_windows=8192 --config.train.val_windows=256 \
  --config.train.lr=1e-3 --config.bridge.unet.self_condition=True --config.sample.steps=50 \
  --config.sample.batch=32 --config.mdm.steps=300 --config.mdm.batch_size=8 \
  --config.mdm.warmup_steps=30 --config.mdm.checkpoint_every=50 --config.mdm.val_every=50 \
  --config.eval.num=128 "--config.eval.methods=real_text,unigram_sampler,bigram_sampler,mdm" \
  --config.sample.unmask=random "$@"
