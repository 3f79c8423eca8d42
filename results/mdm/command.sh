#!/bin/bash
# The masked diffusion row beside the references (results/mdm): SmolLM2-135M post-trained
# into an MDM for 100 steps x 8 windows x 64 tokens (51k tokens), 16 reveal steps, 64 samples,
# judged with real text, the calibration samplers and embedding rounding (the l = 0 bridge,
# the quick preset's UNet). Resumable: rerun the same command.
cd "$(dirname "$0")/../.."
exec python -m dihal_jax.cli eval --config=configs/smollm2_135m.py --workdir=runs/mdm \
  "--config.eval.methods=real_text,unigram_sampler,bigram_sampler,ar_backbone,embedding_rounding,mdm" \
  --config.mdm.steps=100 --config.mdm.batch_size=8 --config.mdm.warmup_steps=10 \
  --config.mdm.lr=1e-4 --config.mdm.checkpoint_every=25 --config.mdm.val_every=25 \
  --config.train.steps=400 --config.train.warmup_steps=40 --config.train.cache_windows=2048 \
  --config.train.val_windows=128 --config.train.lr=1e-3 --config.bridge.unet.channels=64 \
  --config.sample.steps=16 --config.sample.mdm_steps=16 --config.sample.batch=32 \
  --config.eval.num=64 --config.eval.prefix=0 \
  "--config.eval.noise_levels=(0.3,)"
