#!/bin/bash
# DGLM attribute control on SmolLM2-135M (results/control): Austen vs Moby Dick, the
# defaults of the dglm config section (8,000 train windows, a 400-step projector with the
# backbone frozen, a 2,000-step latent denoiser, 64 balanced test prefixes per row), and
# DiHAL's bridge at l* trained on the same passages with their labels (800 steps; rows
# dihal and dihal_cfg/T, classifier-free guidance w = 3).
# Resumable: a rerun of a finished workdir re-evaluates without training.
cd "$(dirname "$0")/../.."
python -m dihal_jax.cli dglm --config=configs/smollm2_135m.py --workdir=runs/dglm || exit 1
cp runs/dglm/report.json runs/dglm/report.md runs/dglm/samples.md runs/dglm/control.png \
  results/control/
cp runs/dglm/projector/metrics.jsonl results/control/projector_metrics.jsonl
cp runs/dglm/latent_denoiser/metrics.jsonl results/control/latent_denoiser_metrics.jsonl
cp runs/dglm/dihal_cfg/metrics.jsonl results/control/dihal_cfg_metrics.jsonl
