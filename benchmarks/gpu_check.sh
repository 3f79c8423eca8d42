#!/usr/bin/env bash
# One short accelerator check (run through the device tool on a CUDA machine
# whose image already has jax[cuda], flax, torch and transformers):
#   1. versions and the GPU;
#   2. parity tests (JAX on the GPU vs torch on the CPU), default matmul precision
#      and JAX_DEFAULT_MATMUL_PRECISION=highest;
#   3. `dihal parity` on a SmolLM2-shaped random model;
#   4. the backbone benchmark, float32 and bfloat16, JAX vs torch both on the GPU.
# Usage: bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== parity tests, default precision"
python3 -m pytest -q -p no:cacheprovider tests/test_backbone_parity.py tests/test_config_rope.py 2>&1 | tail -8
echo "== parity tests, highest precision"
JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_backbone_parity.py 2>&1 | tail -4
for precision in default highest; do
  echo "== dihal parity, SmolLM2-shaped random weights, precision $precision"
  JAX_DEFAULT_MATMUL_PRECISION=$precision python3 -m dihal_jax.cli parity \
    --config=configs/smollm2_135m.py --config.model.checkpoint= --config.mesh.data=1 \
    --workdir="/tmp/parity_$precision" 2>&1 | grep -E "^\||tokens|report"
  cp "/tmp/parity_$precision/report.json" "$out/parity_$precision.json"
done
echo "== benchmark"
python3 benchmarks/backbone_forward.py --random-weights --repeats 20 --out "$out/bench_fp32.json" 2>&1 | grep -v "it/s"
python3 benchmarks/backbone_forward.py --random-weights --repeats 20 --dtype bfloat16 --out "$out/bench_bf16.json" 2>&1 | grep -v "it/s"
python3 benchmarks/backbone_forward.py --random-weights --repeats 10 --dtype bfloat16 --batch 32 --tokens 1024 --out "$out/bench_bf16_32x1024.json" 2>&1 | grep -v "it/s"
