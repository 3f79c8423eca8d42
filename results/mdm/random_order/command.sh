#!/bin/bash
# The same 100-step MDM as results/mdm, sampled in random order (MDLM's ancestral sampler)
# instead of by confidence. Run results/mdm/command.sh first, then copy its trained model:
#   mkdir -p runs/mdm_random && cp -r runs/mdm/mdm runs/mdm_random/
cd "$(dirname "$0")/../../.."
exec python -m dihal_jax.cli eval --config=configs/smollm2_135m.py --workdir=runs/mdm_random \
  "--config.eval.methods=real_text,mdm" \
  --config.mdm.steps=100 --config.mdm.batch_size=8 --config.mdm.warmup_steps=10 \
  --config.mdm.lr=1e-4 --config.mdm.checkpoint_every=25 --config.mdm.val_every=25 \
  --config.sample.mdm_steps=16 --config.sample.batch=32 --config.eval.num=64 \
  --config.eval.prefix=0 --config.sample.unmask=random
