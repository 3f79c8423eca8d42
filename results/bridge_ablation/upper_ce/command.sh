#!/bin/bash
# The upper-layer token loss beside the bridge without it (results/bridge_ablation/upper_ce):
# the protocol of ../command.sh, unet_scratch and unet_upper_ce (the same UNet plus 0.1 x the
# cross-entropy of the true next tokens from its x0 estimates of 2 windows per step through
# the frozen upper layers and LM head), joint at β = 1 and 0.3 with T bisected to real
# text's entropy.
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=unet_scratch,unet_upper_ce --config.train.upper_ce=0.1 \
  "--config.ablate.betas=(1.0,0.3)" --config.sample.beta=0.3
