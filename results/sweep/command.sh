#!/bin/bash
# The committed layer sweep (results/sweep): resumable, rerun the same command (finished
# runs are read back, not retrained). Austen: 15 layers x 3 seeds, one epoch of 2,048 cached
# windows (128 steps of 16) per run; then Moby Dick, 5 of those layers x 2 seeds, judging the
# weights fitted on Austen. The layers run as two processes (one UNet step keeps about one core busy),
# then one call over every layer writes the report. XLA's persistent compilation cache
# spares recompiling the same steps for every run.
set -e
cd "$(dirname "$0")/../.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-runs/sweep/xla_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
PROTOCOL=(--config=configs/smollm2_135m.py
  --config.train.cache_windows=2048 --config.train.val_windows=128 --config.train.batch_size=16
  --config.train.warmup_steps=12 --config.train.lr=1e-3 --config.train.val_every=64
  --config.train.checkpoint_every=128 --config.train.log_every=16
  --config.bridge.unet.channels=64 --config.sweep.eval_windows=32)
sweep() {  # sweep WORKDIR LAYERS_A LAYERS_B [flags]: locate, two halves in parallel, the report
  local workdir=$1 a=$2 b=$3
  shift 3
  python -m dihal_jax.cli locate "${PROTOCOL[@]}" "$@" --workdir="$workdir/locate"
  python -m dihal_jax.cli sweep "${PROTOCOL[@]}" "$@" --workdir="$workdir" --layers="$a" \
    > "$workdir/part_a.log" 2>&1 &
  python -m dihal_jax.cli sweep "${PROTOCOL[@]}" "$@" --workdir="$workdir" --layers="$b" \
    > "$workdir/part_b.log" 2>&1
  wait
  python -m dihal_jax.cli sweep "${PROTOCOL[@]}" "$@" --workdir="$workdir" --layers="$a,$b"
}
mkdir -p runs/sweep/austen runs/sweep/moby_dick
sweep runs/sweep/austen 0,2,4,6,10,14,20,28 1,3,5,8,12,16,24 --config.sweep.seeds=3
MOBY=(--config.data.dir=builtin:moby_dick --config.data.ood_dir=builtin:austen
  --config.sweep.seeds=2)
sweep runs/sweep/moby_dick 1,3,6 12,20 "${MOBY[@]}"
python -m dihal_jax.cli sweep "${PROTOCOL[@]}" "${MOBY[@]}" --workdir=runs/sweep/moby_dick \
  --config.sweep.fitted_from=runs/sweep/austen/report.json --layers=1,3,6,12,20
