#!/bin/bash
# The tolerant decoder on the backbone-initialised transformer bridge
# (results/bridge_ablation/tolerant_transformer): the protocol of ../tolerant/command.sh with
# transformer_backbone read by the plain upper layers and through its own LoRA adapters
# (rank 16, 300 steps x 8 windows), joint at β = 1 and 0.3 with T bisected to real text's
# entropy. Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=transformer_backbone,transformer_backbone_tolerant \
  "--config.ablate.betas=(1.0,0.3)" --config.sample.beta=0.3
