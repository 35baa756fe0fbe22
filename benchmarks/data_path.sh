#!/usr/bin/env bash
# The CPU data-path target of issue 16, from nothing: a folder of COUNT generated photos
# (250-500 px, mixed aspect ratios, some EXIF-rotated), prepared once raw and once as JPEG for
# 64-px crops; then data_path.py measures, side by side in one process, the images/s of
# torchvision's per-image ImageFolder pipeline, of both prepared folders and of streaming the
# JPEG folder, with each path's peak memory in a fresh process (benchmarks/data_path.py says
# how); then a short BYOL run (small backbone) on each sslplug path reports the data-wait
# share of training. The photos and prepared folders are kept and reused: run it again to
# measure again. Run it on a quiet machine: the figures are only as good as the machine is idle.
#
#   bash benchmarks/data_path.sh                        # 50,000 photos under /tmp (about 2.5 GB)
#   COUNT=2000 BATCHES=5 STEPS=3 bash benchmarks/data_path.sh    # a quick try
set -euo pipefail
COUNT=${COUNT:-50000}
PHOTOS=${PHOTOS:-/tmp/photos$((COUNT / 1000))k}
SIZE=${SIZE:-64}
WORKERS=${WORKERS:-2}
BATCH=${BATCH:-256}
BATCHES=${BATCHES:-40}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-20}          # training steps of each data-wait run (0: none)
OUT=${OUT:-bench/data_path}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

python "$here/make_photos.py" "$PHOTOS" --count "$COUNT" --workers "$WORKERS"
du -sh "$PHOTOS"
for encoding in raw jpeg; do
  if [ ! -f "$PHOTOS.$encoding/sslplug-data.json" ]; then
    python -m sslplug prepare "$PHOTOS" "$PHOTOS.$encoding" --image-size "$SIZE" \
      --encoding "$encoding" --workers "$WORKERS"
  fi
  du -sh "$PHOTOS.$encoding"
done

python "$here/data_path.py" --data "$PHOTOS" --prepared "$PHOTOS.raw" --prepared "$PHOTOS.jpeg" \
  --image-size "$SIZE" --batch "$BATCH" --workers "$WORKERS" --batches "$BATCHES" \
  --repeats "$REPEATS" --out "$OUT/data_path.json" | tee "$OUT/data_path.txt"

if [ "$STEPS" -gt 0 ]; then
  for data in "$PHOTOS.raw" "$PHOTOS.jpeg" "$PHOTOS"; do
    echo "== BYOL, small backbone, $SIZE px, $STEPS steps of $BATCH, data.cache_gb=0: $data"
    python -m sslplug run --data "$data" --backbone small --epochs 1 --batch-size "$BATCH" \
      --out "$OUT/run" --overwrite --no-progress --disable knn --disable tensorboard \
      --disable view_grid --set data.image_size="$SIZE" --set data.cache_gb=0 \
      --set data.workers="$WORKERS" --set health.samples=0 \
      --set train.max_steps_per_epoch="$STEPS" | tail -n 1
  done | tee "$OUT/data_wait.txt"
fi
