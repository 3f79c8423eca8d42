#!/bin/bash
# The bridge ablation's two leading rows and unet_logit_normal judged at matched entropy
# (results/bridge_ablation/entropy_matched): the protocol of ../command.sh, the same workdir and
# bridges, read by `joint` at β = 0.3 with T bisected to real text's entropy (at β = 1 no bridge
# reaches it: ../report.md).
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../command.sh" \
  --config.ablate.rows=unet_scratch,transformer_backbone,unet_logit_normal \
  --config.sample.beta=0.3 "--config.ablate.betas=(0.3,)"
