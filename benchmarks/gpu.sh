#!/usr/bin/env bash
# What the first run on a GPU must show at once, then the GPU figures of the performance issue,
# in one script of at most BUDGET seconds (570: under 10 minutes on one H200):
#
#  (1) methods: every built-in method with ResNet-18 and with a ViT (vit_tiny) for a few steps
#      through the engine (loader, views, step, checkpoint), each ok with its img/s and peak
#      memory, fail with the first line of its error, or n/a (MAE and I-JEPA need a ViT);
#      a failure does not stop the others (benchmarks/gpu_check.py methods);
#  (2) branches: what sslplug does only on CUDA: bf16 autocast, channels-last weights, pinned
#      memory and non-blocking copies, nvJPEG decoding of a prepared JPEG store, a torchrun rank
#      with NCCL and SyncBatchNorm (benchmarks/gpu_check.py branches; docs/gpu.md);
#  (a) views/s, model-alone img/s and training-step img/s of SimCLR (BENCH) with ResNet-18
#      (CIFAR stem) on 32-px images, batch 512, bf16 autocast, channels-last weights, without
#      and with torch.compile (`sslplug bench`, random images held on the device's side);
#  (b) the data-wait share of those steps, and of the run below;
#  (c) a fixed-time SimCLR ResNet-18 run on the CIFAR-10 JPEG folders: MINUTES of training
#      (train.max_minutes, kNN after every epoch), the epochs done, the kNN top-1 against the
#      seconds of training and of wall time, and the time to 90% kNN extrapolated
#      (benchmarks/gpu_report.py states the method).
#
# The parts run in this order (PARTS), each one after another's failure. Every command runs
# under `timeout` with the seconds of BUDGET left, parts (a) and (c) are left out when too
# little is left, and the fixed-time run's MINUTES shrink to fit; so the script ends in time
# and benchmarks/gpu_report.py always prints its summary tables (methods, branches, speed,
# run) last.
#
# Every figure is printed and written under $OUT as JSON: methods.jsonl, branches.json,
# bench/<method>[_compiled].json, run/summary.json, and report.json with all of them. On the
# GPU machine $OUT is the folder that comes back; the run's checkpoint stays outside it, in $RUN.
#
#   bash benchmarks/gpu.sh         # on the GPU machine; CIFAR-10 from bench/cifar10-jpeg.tar.gz
#
#   DEVICE=cpu PRECISION=fp32 PARTS="methods branches" MATRIX_BACKBONES="small vit_micro" \
#     MATRIX_METHODS="simclr mae" MATRIX_STEPS=1 MATRIX_WARMUP=1 MATRIX_BATCH=16 \
#     BRANCHES="pinned_memory nvjpeg torchrun" bash benchmarks/gpu.sh   # its logic, on a CPU
#
#   DEVICE=cpu BACKBONE=small BATCH=16 STEPS=1 REPEATS=1 WARMUP=1 PRECISION=fp32 PEAK=0 \
#     WORKERS=0 MINUTES=0.3 PER_CLASS=20 ARCHIVE=../shared/data/cifar10-jpeg.tar.gz \
#     PARTS="speed run" bash benchmarks/gpu.sh       # parts (a) to (c) on a CPU, tiny
#
# Settings (environment variables, defaults for the H200):
#   OUT=bench/gpu  DEVICE=cuda  PRECISION=bf16  BUDGET=570 (seconds for the whole script)
#   PARTS="methods branches speed run"   the parts to run, in this order
#   MATRIX_METHODS=""  methods of part (1) (empty: all fifteen)
#   MATRIX_BACKBONES="resnet18 vit_tiny"  MATRIX_BATCH=256
#   MATRIX_STEPS=5 MATRIX_WARMUP=2   timed steps of each pair, after untimed ones
#   BRANCHES=""        branches of part (2) (empty: all): bf16_autocast channels_last
#                      pinned_memory nvjpeg torchrun
#   BACKBONE=resnet18  BATCH=512  PEAK=989 (TFLOP/s)   parts (a) to (c)
#   STEPS=10 REPEATS=5 WARMUP=3   batches per timed group, groups, untimed batches before each
#   WORKERS=8          DataLoader workers of the per-image baseline
#   BENCH="simclr"     methods of part (a), e.g. "simclr byol"; COMPILE="0 1": without and with
#   METHODS=""         more methods for `sslplug bench` without compile
#   ARCHIVE=bench/cifar10-jpeg.tar.gz  CIFAR=bench/cifar   the archive, and where it is unpacked
#   PER_CLASS=0        images per class and split for the run (0: all of CIFAR-10)
#   MINUTES=3          training minutes of the fixed-time run (train.max_minutes), at most
#   EPOCHS=500         its planned epochs (the schedule's length: the reference's 500 epochs, so
#                      that the run is the beginning of the run the extrapolation speaks of)
#   RUN_COMPILE=auto   compile the run: auto = if SimCLR compiled in part (a); 1; 0
#   MAX_STEPS=0        train.max_steps_per_epoch of the run (0: whole epochs)
#   RUN=bench/gpu_run  the run's folder (checkpoint, TensorBoard)
set -euo pipefail
OUT=${OUT:-bench/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-570}
PARTS=${PARTS:-"methods branches speed run"}
MATRIX_METHODS=${MATRIX_METHODS:-""}
MATRIX_BACKBONES=${MATRIX_BACKBONES:-"resnet18 vit_tiny"}
MATRIX_BATCH=${MATRIX_BATCH:-256}
MATRIX_STEPS=${MATRIX_STEPS:-5}
MATRIX_WARMUP=${MATRIX_WARMUP:-2}
BRANCHES=${BRANCHES:-""}
BACKBONE=${BACKBONE:-resnet18}
BATCH=${BATCH:-512}
PRECISION=${PRECISION:-bf16}
PEAK=${PEAK:-989}          # NVIDIA's H100/H200 SXM dense bf16 tensor-core peak, TFLOP/s
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-3}
WORKERS=${WORKERS:-8}
BENCH=${BENCH:-"simclr"}
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

wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { echo $((BUDGET - SECONDS)); }
fits() {  # fits SECONDS WHAT: whether the budget has SECONDS left for WHAT; says so if not
  if [ "$(left)" -ge "$1" ]; then return 0; fi
  echo "!! $2 left out: $(left) s of the budget ($BUDGET s) left, it needs about $1 s"
  return 1
}

# (1) every method with every backbone; gpu_check.py exits with 75 when CUDA is lost in its
# process (a device-side assert), and a new process takes the pairs left
if wants methods && fits 30 "part (1)"; then
  echo "== (1) every method, $MATRIX_STEPS steps after $MATRIX_WARMUP, batch $MATRIX_BATCH, $PRECISION (${SECONDS}s into the script)"
  for attempt in 1 2 3 4 5; do
    status=0
    fits 10 "attempt $attempt of part (1)" || break
    # shellcheck disable=SC2086  # the lists are words
    timeout "$(left)" python benchmarks/gpu_check.py methods "$OUT" --device "$DEVICE" \
      --precision "$PRECISION" --batch-size "$MATRIX_BATCH" --steps "$MATRIX_STEPS" \
      --warmup "$MATRIX_WARMUP" --backbones $MATRIX_BACKBONES \
      ${MATRIX_METHODS:+--methods $MATRIX_METHODS} || status=$?
    if [ "$status" != 75 ]; then break; fi
    echo "!! CUDA was lost (attempt $attempt): a new process for the pairs left"
  done
  if [ "$status" != 0 ]; then echo "!! part (1) ended with status $status; see above"; fi
fi

# (2) the branches only CUDA takes
if wants branches && fits 30 "part (2)"; then
  echo "== (2) the branches only CUDA takes (${SECONDS}s into the script)"
  # shellcheck disable=SC2086
  timeout "$(left)" python benchmarks/gpu_check.py branches "$OUT" --device "$DEVICE" \
    --precision "$PRECISION" --batch-size "$MATRIX_BATCH" --steps "$MATRIX_STEPS" \
    --warmup "$MATRIX_WARMUP" ${BRANCHES:+--branches $BRANCHES} ||
    echo "!! part (2) ended with status $?; see above"
fi

bench() {  # bench NAME METHOD COMPILED [flags...]
  local name=$1 method=$2 compiled=$3
  shift 3
  echo "== $name (${SECONDS}s into the script)"
  timeout "$(left)" python -m sslplug bench --plugin "$method" --backbone "$BACKBONE" \
    --batch-size "$BATCH" --device "$DEVICE" --precision "$PRECISION" --peak-tflops "$PEAK" \
    --workers "$WORKERS" \
    --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" \
    --set "train.compile=$([ "$compiled" = 1 ] && echo true || echo false)" "$@" \
    --out "$OUT/bench/$name.json" | tee "$OUT/bench/$name.txt"
}

# (a, b) speed, without and with compile; the per-image baseline only beside the eager step.
# A part that fails is reported and the script goes on: the other figures still come back.
simclr_compiled=0
if wants speed; then
  for method in $BENCH; do
    for compiled in $COMPILE; do
      if [ "$compiled" = 1 ]; then
        fits 90 "compiled bench of $method" || continue
        if bench "${method}_compiled" "$method" 1 --no-baseline; then
          if [ "$method" = simclr ]; then simclr_compiled=1; fi
        else
          echo "!! $method did not compile on $DEVICE; see the message above"
        fi
      else
        fits 45 "bench of $method" || continue
        bench "$method" "$method" 0 || echo "!! sslplug bench of $method failed"
      fi
    done
  done
  for method in $METHODS; do
    fits 45 "bench of $method" || continue
    bench "$method" "$method" 0 || echo "!! sslplug bench of $method failed"
  done
fi

# (c) the fixed-time run on CIFAR-10, its minutes cut to what the budget leaves (90 s kept for
# the start, the last kNN, and the report; -1 where not even half a minute fits)
minutes=$(awk -v m="$MINUTES" -v l="$(left)" \
  'BEGIN { x = (l - 90) / 60; print (x >= m ? m : (x >= 0.5 ? x : -1)) }')
if ! wants run; then
  :
elif [ ! -d "$CIFAR/train" ] && [ ! -f "$ARCHIVE" ]; then
  echo "!! part (c) left out: no CIFAR-10 at $CIFAR/train nor an archive at $ARCHIVE"
elif [ "$minutes" = -1 ]; then
  echo "!! part (c) left out: $(left) s of the budget ($BUDGET s) left, under half a minute of training"
else
  if [ "$minutes" != "$MINUTES" ]; then
    echo "!! the fixed-time run shrinks to $minutes minutes, what the budget ($BUDGET s) leaves"
  fi
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
  echo "== SimCLR on $DATA for $minutes minutes, compile $run_compile (${SECONDS}s into the script)"
  timeout "$(left)" python -m sslplug run --plugin simclr --data "$DATA" --backbone "$BACKBONE" \
    --batch-size "$BATCH" --device "$DEVICE" --epochs "$EPOCHS" --out "$RUN" --overwrite \
    --no-progress --set data.image_size=32 --set train.precision="$PRECISION" \
    --set train.compile="$run_compile" --set train.max_minutes="$minutes" \
    --set train.max_steps_per_epoch="$MAX_STEPS" --set knn.every=1 --set health.every=1 \
    --set tensorboard.embedding_samples=0 2>&1 | tee "$OUT/run/log.txt" ||
    echo "!! the fixed-time run failed; see $OUT/run/log.txt"
  if [ -f "$RUN/summary.json" ]; then
    cp "$RUN/summary.json" "$RUN/settings.toml" "$OUT/run/"
  fi
fi

echo "== report (${SECONDS}s into the script)"
python benchmarks/gpu_report.py "$OUT"
echo "gpu.sh took ${SECONDS}s"
