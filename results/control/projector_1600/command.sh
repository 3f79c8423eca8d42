#!/bin/bash
# DGLM with a 4x longer projector (1,600 steps x 8 windows, the backbone frozen, guidance
# 10, sweep 3, 30, 100): does a
# decoder that has seen 12,800 passages follow its latent, and the classifier-guided
# proposals with it? Everything else is results/control's: the same passages, latents,
# latent classifiers and latent denoiser (copied from its workdir runs/dglm_frozen when
# that exists, as this committed run did; trained afresh otherwise), the same 64 prefixes and
# keys. No DiHAL rows (dglm.bridge_steps=0: results/control has them). Resumable.
cd "$(dirname "$0")/../../.."
mkdir -p runs/dglm_long
for part in latents.npz classifiers.npz latent_denoiser; do
  if [ -e runs/dglm_frozen/$part ] && [ ! -e runs/dglm_long/$part ]; then
    cp -r runs/dglm_frozen/$part runs/dglm_long/
  fi
done
python -m dihal_jax.cli dglm --config=configs/smollm2_135m.py --workdir=runs/dglm_long \
  --config.dglm.steps=1600 --config.dglm.bridge_steps=0 --config.dglm.lora_rank=0 \
  --config.dglm.scale=10 --config.dglm.scale_sweep="(3.0,30.0,100.0)" || exit 1
out=results/control/projector_1600
cp runs/dglm_long/report.json runs/dglm_long/report.md runs/dglm_long/samples.md \
  runs/dglm_long/control.png "$out"/
cp runs/dglm_long/projector/metrics.jsonl "$out"/projector_metrics.jsonl
