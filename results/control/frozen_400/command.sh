#!/bin/bash
# DGLM attribute control on SmolLM2-135M with the backbone frozen (the first measured run):
# Austen vs Moby Dick, 8,000 train windows, a 400-step projector (no LoRA), a 2,000-step
# latent denoiser, 64 balanced test prefixes per row, classifier guidance 10 (sweep 3, 30,
# 100), and DiHAL's bridge at l* trained on the same passages with their labels (800 steps;
# rows dihal and dihal_cfg/T, classifier-free guidance w = 3).
# Resumable: a rerun of a finished workdir re-evaluates without training.
cd "$(dirname "$0")/../../.."
python -m dihal_jax.cli dglm --config=configs/smollm2_135m.py --workdir=runs/dglm_frozen \
  --config.dglm.lora_rank=0 --config.dglm.steps=400 --config.dglm.scale=10 \
  --config.dglm.scale_sweep="(3.0,30.0,100.0)" || exit 1
out=results/control/frozen_400
cp runs/dglm_frozen/report.json runs/dglm_frozen/report.md runs/dglm_frozen/samples.md \
  runs/dglm_frozen/control.png "$out"/
cp runs/dglm_frozen/projector/metrics.jsonl "$out"/projector_metrics.jsonl
cp runs/dglm_frozen/latent_denoiser/metrics.jsonl "$out"/latent_denoiser_metrics.jsonl
cp runs/dglm_frozen/dihal_cfg/metrics.jsonl "$out"/dihal_cfg_metrics.jsonl
