#!/bin/bash
# Both bridges of the ablation with and without the tolerant decoder, in one run
# (results/bridge_ablation/tolerant_pairs): the protocol of ../command.sh, rows unet_scratch,
# unet_scratch_tolerant, transformer_backbone and transformer_backbone_tolerant, joint at
# β = 0.3 with T bisected to real text's entropy. A tolerant row reads its twin's bridge
# with its twin's key, so each pair differs only in the decoder (LoRA rank 16, 300 steps x 8
# windows, trained on the bridge's estimates of re-noised train states).
# Resumable: rerun the same command (trained bridges and decoders are reused).
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=unet_scratch,unet_scratch_tolerant,transformer_backbone,transformer_backbone_tolerant \
  "--config.ablate.betas=(0.3,)" --config.sample.beta=0.3
