#!/bin/bash
# The joint readout between β = 1 (its oracle returns the text, the bridge rows cannot reach
# real text's entropy) and β = 0.3 (every row reaches it, the oracle no longer returns the
# text): unet_scratch and its oracle at β = 0.7 and 0.5, T bisected to real text's entropy
# (results/bridge_ablation/beta_ladder). Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" --config.ablate.rows=unet_scratch \
  "--config.ablate.betas=(0.7,0.5)" --config.sample.beta=0.5
