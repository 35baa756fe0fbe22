#!/usr/bin/env bash
# The GPU figures of the performance issue, in one script of under 10 minutes on one H200:
#
#  (a) views/s, model-alone img/s and training-step img/s of SimCLR and BYOL with ResNet-18
#      (CIFAR stem) on 32-px images, batch 512, bf16 autocast, channels-last weights, without
#      and with torch.compile (`sslplug bench`, random images held on the device's side);
#  (b) the data-wait share of those steps, and of the run below;
#  (c) a fixed-time SimCLR ResNet-18 run on the CIFAR-10 JPEG folders: MINUTES of training
#      (train.max_minutes, kNN after every epoch), the epochs done, the kNN top-1 against the
#      seconds of training and of wall time, and the time to 90% kNN extrapolated
#      (benchmarks/gpu_report.py states the method).
#
# Every figure is printed and written under $OUT as JSON: bench/<method>[_compiled].json,
# run/summary.json, and report.json with all of them. On the GPU machine $OUT is the folder that
# comes back; the run's checkpoint stays outside it, in $RUN.
#
#   bash benchmarks/gpu.sh         # on the GPU machine; CIFAR-10 from bench/cifar10-jpeg.tar.gz
#
#   DEVICE=cpu BACKBONE=small BATCH=16 STEPS=1 REPEATS=1 WARMUP=1 PRECISION=fp32 PEAK=0 \
#     WORKERS=0 MINUTES=0.3 PER_CLASS=20 ARCHIVE=../shared/data/cifar10-jpeg.tar.gz \
#     bash benchmarks/gpu.sh       # the same script on a CPU, tiny, to try it first
#
# Settings (environment variables, defaults for the H200):
#   OUT=bench/gpu  DEVICE=cuda  BACKBONE=resnet18  BATCH=512  PRECISION=bf16  PEAK=989 (TFLOP/s)
#   STEPS=10 REPEATS=5 WARMUP=3   batches per timed group, groups, untimed batches before each
#   WORKERS=8          DataLoader workers of the per-image baseline
#   BENCH="simclr byol"   methods of part (a); COMPILE="0 1": without and with compile
#   METHODS=""         more methods for `sslplug bench` without compile, e.g. the six of the
#                      earlier check: "barlow_twins rotnet jigsaw cpc" (each adds ~half a minute)
#   ARCHIVE=bench/cifar10-jpeg.tar.gz  CIFAR=bench/cifar   the archive, and where it is unpacked
#   PER_CLASS=0        images per class and split for the run (0: all of CIFAR-10)
#   MINUTES=3          training minutes of the fixed-time run (train.max_minutes)
#   EPOCHS=500         its planned epochs (the schedule's length: the reference's 500 epochs, so
#                      that the run is the beginning of the run the extrapolation speaks of)
#   RUN_COMPILE=auto   compile the run: auto = if SimCLR compiled in part (a); 1; 0
#   MAX_STEPS=0        train.max_steps_per_epoch of the run (0: whole epochs)
#   RUN=bench/gpu_run  the run's folder (checkpoint, TensorBoard)
set -euo pipefail
OUT=${OUT:-bench/gpu}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-resnet18}
BATCH=${BATCH:-512}
PRECISION=${PRECISION:-bf16}
PEAK=${PEAK:-989}          # NVIDIA's H100/H200 SXM dense bf16 tensor-core peak, TFLOP/s
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-3}
WORKERS=${WORKERS:-8}
BENCH=${BENCH:-"simclr byol"}
COMPILE=${COMPILE:-"0 1"}
METHODS=${METHODS:-""}
ARCHIVE=${ARCHIVE:-bench/cifar10-jpeg.tar.gz}
CIFAR=${CIFAR:-bench/cifar}
PER_CLASS=${PER_CLASS:-0}
MINUTES=${MINUTES:-3}
EPOCHS=${EPOCHS:-500}
RUN_COMPILE=${RUN_COMPILE:-auto}
MAX_STEPS=${MAX_STEPS:-0}
RUN=${RUN:-bench/gpu_run}
mkdir -p "$OUT/bench" "$OUT/run"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

bench() {  # bench NAME METHOD COMPILED [flags...]
  local name=$1 method=$2 compiled=$3
  shift 3
  echo "== $name (${SECONDS}s into the script)"
  python -m sslplug bench --plugin "$method" --backbone "$BACKBONE" --batch-size "$BATCH" \
    --device "$DEVICE" --precision "$PRECISION" --peak-tflops "$PEAK" --workers "$WORKERS" \
    --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" \
    --set "train.compile=$([ "$compiled" = 1 ] && echo true || echo false)" "$@" \
    --out "$OUT/bench/$name.json" | tee "$OUT/bench/$name.txt"
}

# (a, b) speed, without and with compile; the per-image baseline only beside the eager step.
# A part that fails is reported and the script goes on: the other figures still come back.
simclr_compiled=0
for method in $BENCH; do
  for compiled in $COMPILE; do
    if [ "$compiled" = 1 ]; then
      if bench "${method}_compiled" "$method" 1 --no-baseline; then
        if [ "$method" = simclr ]; then simclr_compiled=1; fi
      else
        echo "!! $method did not compile on $DEVICE; see the message above"
      fi
    else
      bench "$method" "$method" 0 || echo "!! sslplug bench of $method failed"
    fi
  done
done
for method in $METHODS; do
  bench "$method" "$method" 0 || echo "!! sslplug bench of $method failed"
done

# (c) the fixed-time run on CIFAR-10
echo "== CIFAR-10 (${SECONDS}s into the script)"
if [ ! -d "$CIFAR/train" ]; then
  mkdir -p "$CIFAR"
  tar xzf "$ARCHIVE" -C "$CIFAR"
fi
DATA=$CIFAR
if [ "$PER_CLASS" != 0 ]; then  # the first PER_CLASS images of each class and split
  DATA=$CIFAR-$PER_CLASS
  python - "$CIFAR" "$DATA" "$PER_CLASS" <<'PY'
import shutil, sys
from pathlib import Path

source, target, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for folder in sorted(source.glob("*/*/")):
    copy = target / folder.relative_to(source)
    copy.mkdir(parents=True, exist_ok=True)
    for image in sorted(folder.iterdir())[:count]:
        shutil.copy(image, copy / image.name)
PY
fi
case $RUN_COMPILE in
  auto) run_compile=$([ "$simclr_compiled" = 1 ] && echo true || echo false) ;;
  1) run_compile=true ;;
  *) run_compile=false ;;
esac
echo "== SimCLR on $DATA for $MINUTES minutes, compile $run_compile (${SECONDS}s into the script)"
python -m sslplug run --plugin simclr --data "$DATA" --backbone "$BACKBONE" --batch-size "$BATCH" \
  --device "$DEVICE" --epochs "$EPOCHS" --out "$RUN" --overwrite --no-progress \
  --set data.image_size=32 --set train.precision="$PRECISION" --set train.compile="$run_compile" \
  --set train.max_minutes="$MINUTES" --set train.max_steps_per_epoch="$MAX_STEPS" \
  --set knn.every=1 --set health.every=1 --set tensorboard.embedding_samples=0 2>&1 | tee "$OUT/run/log.txt" ||
  echo "!! the fixed-time run failed; see $OUT/run/log.txt"
if [ -f "$RUN/summary.json" ]; then
  cp "$RUN/summary.json" "$RUN/settings.toml" "$OUT/run/"
fi

echo "== report (${SECONDS}s into the script)"
python benchmarks/gpu_report.py "$OUT"
echo "gpu.sh took ${SECONDS}s"
