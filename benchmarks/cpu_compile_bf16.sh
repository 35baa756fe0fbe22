#!/usr/bin/env bash
# train.compile and bf16 on the CPU, side by side, so that docs/benchmarks.md can say what each
# gives here: (1) the median img/s of one BYOL training step (and of the model alone) for each
# backbone, in fp32 and bf16 autocast, without and with torch.compile (`sslplug bench`); (2) the
# kNN top-1 of the default BYOL run (shapes data) in fp32 and in bf16, with its epochs and
# minutes, optionally under a time budget. Run it on an otherwise idle machine: the runs are
# one after another, so a busy spell favours whichever ran then. Without native bf16 (no AMX or
# AVX512-BF16: `python -c "import sslplug.runtime as r; print(r.cpu_has_native_bf16())"`) bf16
# is emulated and slower; train.precision=auto then stays fp32.
#
#   bash benchmarks/cpu_compile_bf16.sh
#   BACKBONES=small MINUTES=3 bash benchmarks/cpu_compile_bf16.sh   # kNN after 3 minutes each
#
# Settings: OUT=bench/cpu_compile_bf16  BACKBONES="small resnet18"  BATCH=64  STEPS=3 REPEATS=3
# WARMUP=1 (untimed batches per group; compiling is done before anything is timed)
# EPOCHS=15 (the default run)  MINUTES=0 (train.max_minutes of the quality runs; 0: no limit)
# QUALITY=1 (0 skips the quality runs)
set -euo pipefail
OUT=${OUT:-bench/cpu_compile_bf16}
BACKBONES=${BACKBONES:-"small resnet18"}
BATCH=${BATCH:-64}
STEPS=${STEPS:-3}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
EPOCHS=${EPOCHS:-15}
MINUTES=${MINUTES:-0}
QUALITY=${QUALITY:-1}
mkdir -p "$OUT/bench"
for backbone in $BACKBONES; do
  for precision in fp32 bf16; do
    for compiled in false true; do
      name=${backbone}_${precision}_compile-${compiled}
      echo "== $name"
      python -m sslplug bench --plugin byol --backbone "$backbone" --batch-size "$BATCH" \
        --device cpu --precision "$precision" --steps "$STEPS" --warmup "$WARMUP" \
        --repeats "$REPEATS" --no-baseline --set "train.compile=$compiled" \
        --out "$OUT/bench/$name.json" > "$OUT/bench/$name.txt"
    done
  done
done
if [ "$QUALITY" = 1 ]; then
  for precision in fp32 bf16; do
    echo "== BYOL, $EPOCHS epochs, $precision"
    python -m sslplug run --epochs "$EPOCHS" --out "$OUT/run_$precision" --overwrite \
      --no-progress --set train.precision="$precision" --set train.max_minutes="$MINUTES" \
      2>&1 | tee "$OUT/run_$precision.log"
  done
fi
python - "$OUT" $BACKBONES <<'PY'
import json, sys
from pathlib import Path

out, backbones = Path(sys.argv[1]), sys.argv[2:]
print(f"{'backbone':<10}{'precision':>10}{'compile':>9}{'step img/s':>12}{'model img/s':>13}"
      f"{'compile s':>11}{'vs fp32':>9}")
for backbone in backbones:
    base = None
    for precision in ("fp32", "bf16"):
        for compiled in ("false", "true"):
            r = json.loads((out / "bench" / f"{backbone}_{precision}_compile-{compiled}.json").read_text())
            step = r["sslplug_step"]["images_per_second"]
            base = base or step
            seconds = f"{r['compile_seconds']:.0f}" if "compile_seconds" in r else "-"
            print(f"{backbone:<10}{precision:>10}{compiled:>9}{step:>12.1f}"
                  f"{r['sslplug_model']['images_per_second']:>13.1f}{seconds:>11}{step / base:>8.2f}x")
runs = [(p, out / f"run_{p}" / "summary.json") for p in ("fp32", "bf16")]
if any(path.is_file() for _, path in runs):
    print(f"{'precision':<10}{'epochs':>8}{'kNN top-1':>11}{'train min':>11}{'img/s':>8}")
    for precision, path in runs:
        s = json.loads(path.read_text())
        minutes = (s["train_seconds"] or 0) / 60
        print(f"{precision:<10}{s['epochs']:>8}{s['knn_top1']:>10.2f}%{minutes:>11.1f}"
              f"{s['images_per_second_median']:>8.0f}")
PY
