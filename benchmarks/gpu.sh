#!/usr/bin/env bash
# The GPU checks of the performance issue, in one script: for each of the six methods, ResNet-18
# with the CIFAR stem, batch 512, bf16 autocast, 32x32 images: images per second of the views,
# the model alone and the whole step, the data-wait share, the per-image baseline where the
# method has one, and the share of the GPU's bf16 peak achieved by forward and backward.
#
#   bash benchmarks/gpu.sh                       # on the GPU machine (H200: 989 dense bf16 TFLOP/s)
#   DEVICE=cpu BACKBONE=small BATCH=16 STEPS=1 REPEATS=1 PRECISION=fp32 bash benchmarks/gpu.sh
#                                                # the same script, tried on a CPU first
set -euo pipefail
OUT=${OUT:-bench/gpu}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-resnet18}
BATCH=${BATCH:-512}
PRECISION=${PRECISION:-bf16}
PEAK=${PEAK:-989}          # NVIDIA's H100/H200 SXM dense bf16 tensor-core peak, TFLOP/s
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-5}
WORKERS=${WORKERS:-8}
METHODS=${METHODS:-"byol simclr barlow_twins rotnet jigsaw cpc"}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
for method in $METHODS; do
  echo "== $method"
  python -m sslplug bench --plugin "$method" --backbone "$BACKBONE" --batch-size "$BATCH" \
    --device "$DEVICE" --precision "$PRECISION" --peak-tflops "$PEAK" --workers "$WORKERS" \
    --steps "$STEPS" --repeats "$REPEATS" --out "$OUT/$method.json" | tee "$OUT/$method.txt"
done
