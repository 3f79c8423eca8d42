#!/bin/bash
# The tolerant decoder beside the bridge it reads (results/bridge_ablation/tolerant): the
# protocol of ../command.sh, unet_scratch read by the plain upper layers and through LoRA
# adapters (rank 16, 300 steps x 8 windows) trained on its estimates of re-noised train
# states, joint at β = 1 and 0.3 with T bisected to real text's entropy.
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=unet_scratch,unet_scratch_tolerant "--config.ablate.betas=(1.0,0.3)" \
  --config.sample.beta=0.3
