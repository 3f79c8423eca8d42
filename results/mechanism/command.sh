#!/bin/bash
# The mechanism study on SmolLM2-135M (results/mechanism).
# 1. The backbone post-trained into a masked diffusion model on a 400-step schedule (8 windows
#    x 64 tokens per step, bidirectional from the first step, the shift on), stopped at its
#    step-250 checkpoint: the run is killed once checkpoints/250 exists (on the 2 shared CPU
#    cores the last 150 steps would have taken another ~1.5 h). Rerunning resumes from 250.
# 2. `dihal mechanism` on that checkpoint: 32 test windows, 32 items per task.
cd "$(dirname "$0")/../.."
MDM=runs/mech_mdm
if [ ! -d "$MDM/checkpoints/250" ]; then
  python -m dihal_jax.cli mdm --config=configs/smollm2_135m.py --workdir="$MDM" \
    --config.mdm.steps=400 --config.mdm.batch_size=8 --config.mdm.warmup_steps=20 \
    --config.mdm.lr=1e-4 --config.mdm.checkpoint_every=25 --config.mdm.val_every=50 &
  trainer=$!
  until [ -f "$MDM/checkpoints/250/_CHECKPOINT_METADATA" ]; do
    kill -0 "$trainer" 2>/dev/null || { echo "dihal mdm stopped before step 250" >&2; exit 1; }
    sleep 5
  done
  kill -9 "$trainer"
fi
exec python -m dihal_jax.cli mechanism --config=configs/smollm2_135m.py \
  --workdir=runs/mechanism --config.mechanism.mdm="$MDM"
