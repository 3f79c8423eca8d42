#!/bin/bash
# The tolerant decoder (results/bridge_ablation/tolerant): the protocol of ../command.sh,
# the unet_scratch bridge read through LoRA adapters (rank 16, 300 steps x 8 windows)
# trained on its estimates of re-noised train states, joint at β = 1 and 0.3 with T
# bisected to real text's entropy, and the true states through the same adapters (its
# oracle). The row alone samples its bridge with the key unet_scratch had as the first row
# of ../upper_ce, so its plain twin is that report's unet_scratch row (the identity reads,
# which never pass through the decoder, agree when the bridges and states are the same).
# Trains unet_scratch into runs/bridge_ablation first if it is not there.
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" --config.ablate.rows=unet_scratch_tolerant \
  "--config.ablate.betas=(1.0,0.3)" --config.sample.beta=0.3
