#!/bin/bash
# Block diffusion (BD3-LM, blocks of 16) at results/mdm's budget: SmolLM2-135M post-trained
# for 100 steps x 8 windows x 64 tokens, sampled in random order with 4 reveal steps per
# block (16 passes per sample, as many as the mdm row's 16 steps), 64 samples. The same
# evaluation windows as results/mdm (its real_text row must match). Resumable.
cd "$(dirname "$0")/../../.."
exec python -m dihal_jax.cli eval --config=configs/smollm2_135m.py --workdir=runs/mdm_block \
  "--config.eval.methods=real_text,unigram_sampler,bigram_sampler,mdm_block" \
  --config.eval.mdm_block=16 \
  --config.mdm.steps=100 --config.mdm.batch_size=8 --config.mdm.warmup_steps=10 \
  --config.mdm.lr=1e-4 --config.mdm.checkpoint_every=25 --config.mdm.val_every=25 \
  --config.sample.mdm_steps=4 --config.sample.batch=32 --config.eval.num=64 \
  --config.eval.prefix=0 --config.sample.unmask=random "$@"
