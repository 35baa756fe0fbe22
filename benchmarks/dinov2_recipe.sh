#!/usr/bin/env bash
# DINO, iBOT and DINOv2 on the vit_micro preset, default data, 15 epochs, seeds 0-2 (issue 27),
# then a table of kNN top-1 and the health measures from each run's TensorBoard scalars.
# Usage:
#
#   bash benchmarks/dinov2_recipe.sh OUT [SEEDS...]
#
# Two runs at a time, one thread each (under an hour per run on two AMD EPYC cores, fp32);
# run nothing else on the machine meanwhile.
set -euo pipefail
out=$1
shift
seeds=("${@:-0 1 2}")
mkdir -p "$out"
run() {  # METHOD SEED ARGS...
    local method=$1 seed=$2
    shift 2
    OMP_NUM_THREADS=1 sslplug run --plugin "$method" --backbone vit_micro --seed "$seed" "$@" \
        --out "$out/$method-$seed" --disable progress > "$out/$method-$seed.log" 2>&1
}
for seed in ${seeds[*]}; do
    run ibot "$seed" &
    run dinov2 "$seed" --set model.registers=4 &
    wait
    run dino "$seed"
done
python "$(dirname "$0")/vit_recipe_table.py" "$out"/*/
