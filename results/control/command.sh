#!/bin/bash
# DGLM attribute control on SmolLM2-135M: Austen vs Moby Dick with the defaults of the dglm
# config section (8,000 train windows; an 800-step projector with LoRA adapters of the
# backbone, rank 16; a 2,000-step latent denoiser; classifier guidance 30, sweep 3, 10,
# 100), 128 balanced test prefixes per row (a fresh draw: results/control/lora, which
# chose the guidance strength, used 64), and DiHAL's bridge at l* trained on the same
# passages with their labels (800 steps; rows dihal and dihal_cfg/T, classifier-free
# guidance w = 3). The latents, classifiers, projector and latent denoiser are
# results/control/lora's (copied from its workdir runs/dglm_lora when that exists, as this
# committed run did: the same settings; trained afresh otherwise).
# Resumable: a rerun of a finished workdir re-evaluates without training.
cd "$(dirname "$0")/../.."
mkdir -p runs/dglm
for part in latents.npz classifiers.npz projector latent_denoiser; do
  if [ -e runs/dglm_lora/$part ] && [ ! -e runs/dglm/$part ]; then
    cp -r runs/dglm_lora/$part runs/dglm/
  fi
done
python -m dihal_jax.cli dglm --config=configs/smollm2_135m.py --workdir=runs/dglm \
  --config.dglm.num=128 || exit 1
cp runs/dglm/report.json runs/dglm/report.md runs/dglm/samples.md runs/dglm/control.png \
  results/control/
cp runs/dglm/projector/metrics.jsonl results/control/projector_metrics.jsonl
cp runs/dglm/latent_denoiser/metrics.jsonl results/control/latent_denoiser_metrics.jsonl
cp runs/dglm/dihal_cfg/metrics.jsonl results/control/dihal_cfg_metrics.jsonl
