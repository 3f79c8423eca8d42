#!/bin/bash
# The paired ablation's winner at ℓ = 0 (results/bridge_ablation/tolerant_pairs/l0): the
# protocol of ../../command.sh with --config.bridge.layer=0 in its own workdir, the row
# transformer_backbone_tolerant alone (its bridge copies backbone blocks 1..4 and is fed
# embeddings), joint at β = 0.3 with T bisected to real text's entropy. Compare with the
# same row at ℓ* = 1 in ../report.md.
# Resumable: rerun the same command.
exec bash "$(dirname "$0")/../../command.sh" --workdir=runs/bridge_ablation_l0 \
  --config.bridge.layer=0 --config.ablate.rows=transformer_backbone_tolerant \
  "--config.ablate.betas=(0.3,)" --config.sample.beta=0.3
