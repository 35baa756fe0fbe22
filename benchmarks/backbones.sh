#!/usr/bin/env bash
# CPU throughput of the backbones, so that a user can choose: one BYOL training step (two 32-px
# views, forward, backward, optimizer, EMA) with each backbone, measured one after the other in
# one script with `sslplug bench`. Run it on an otherwise idle machine.
#
#   bash benchmarks/backbones.sh                  # BACKBONES="small resnet18 vit_micro vit_tiny"
set -euo pipefail
OUT=${OUT:-bench/backbones}
BACKBONES=${BACKBONES:-"small resnet18 vit_micro vit_tiny"}
BATCH=${BATCH:-64}
STEPS=${STEPS:-3}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"
for backbone in $BACKBONES; do
  python -m sslplug bench --plugin byol --backbone "$backbone" --batch-size "$BATCH" \
    --device cpu --precision fp32 --steps "$STEPS" --warmup 1 --repeats "$REPEATS" \
    --no-baseline --out "$OUT/$backbone.json" > "$OUT/$backbone.txt"
done
python - "$OUT" $BACKBONES <<'PY'
import json, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
import torch
from sslplug.nn import build_backbone

print(f"{'backbone':<10} {'parameters':>11} {'step img/s':>11} {'model img/s':>12} {'vs small':>9}")
rates = {}
for name in names:
    result = json.loads((out / f"{name}.json").read_text())
    params = sum(p.numel() for p in build_backbone(name, 32)[0].parameters())
    rates[name] = result["sslplug_step"]["images_per_second"]
    model = result["sslplug_model"]["images_per_second"]
    ratio = rates[name] / rates.get("small", rates[name])
    print(f"{name:<10} {params:>11,} {rates[name]:>11.1f} {model:>12.1f} {ratio:>8.3f}x")
PY
