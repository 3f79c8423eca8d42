#!/bin/bash
# DGLM with LoRA adapters of the backbone trained beside the projector (rank 16, alpha 16, on
# every attention and MLP kernel; 800 steps x 8 windows): does a decoder allowed to change
# follow its latent further than the frozen one (frozen_400: 400 steps; projector_1600:
# 1,600 steps)? Judged first by dglm_target_latent, the guided rows' oracle. Everything else
# as in those runs (the same passages, latents, classifiers, latent denoiser settings, 64
# prefixes and keys, guidance 10, sweep 3, 30, 100); no DiHAL rows (dglm.bridge_steps=0).
# Resumable.
cd "$(dirname "$0")/../../.."
python -m dihal_jax.cli dglm --config=configs/smollm2_135m.py --workdir=runs/dglm_lora \
  --config.dglm.steps=800 --config.dglm.lora_rank=16 --config.dglm.lora_alpha=16 \
  --config.dglm.bridge_steps=0 --config.dglm.scale=10 \
  --config.dglm.scale_sweep="(3.0,30.0,100.0)" || exit 1
out=results/control/lora
cp runs/dglm_lora/report.json runs/dglm_lora/report.md runs/dglm_lora/samples.md \
  runs/dglm_lora/control.png "$out"/
cp runs/dglm_lora/projector/metrics.jsonl "$out"/projector_metrics.jsonl
