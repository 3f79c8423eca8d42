#!/bin/bash
# The bridge ablation's two leading rows and unet_logit_normal judged at matched entropy
# (results/bridge_ablation/entropy_matched): the protocol of ../command.sh, the same workdir and
# bridges, read by `joint` at every β of ablate.betas with T bisected to real text's entropy.
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=unet_scratch,transformer_backbone,unet_logit_normal \
  "--config.ablate.betas=(1.0,0.3,0.1)"
