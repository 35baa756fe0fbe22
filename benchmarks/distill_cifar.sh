#!/usr/bin/env bash
# Distillation on CIFAR-10 (issue 26): a small ConvNet distilled from a teacher pre-trained here,
# against the same student pre-trained by SimCLR for as many epochs, and a teacher of random
# weights; then the 1%-label evaluation of each. Usage:
#
#   bash benchmarks/distill_cifar.sh TEACHER_RUN OUT [EPOCHS]
#
# TEACHER_RUN: a run folder of the teacher (docs/benchmarks.md: VICReg, 10 epochs on CIFAR-10,
# benchmarks/quality.py). The CIFAR-10 JPEG folders are unpacked to /tmp/cifar if missing.
# Each command's wall time is printed by `time`; run nothing else on the machine meanwhile.
set -euo pipefail
teacher=$1
out=$2
epochs=${3:-3}
data=/tmp/cifar
if [ ! -d "$data/train" ]; then
    mkdir -p "$data" && tar -xzf "$(dirname "$0")/../../shared/data/cifar10-jpeg.tar.gz" -C "$data"
fi
common=(--data "$data" --epochs "$epochs" --disable progress --set knn.every=1)
mkdir -p "$out"
run() {  # NAME ARGS...: one pre-training, its wall time, then its 1%-label evaluation
    local name=$1
    shift
    rm -rf "${out:?}/$name"
    /usr/bin/time -f "$name: wall %e s" sslplug run "$@" "${common[@]}" --out "$out/$name" \
        > "$out/$name.log" 2>&1 || { tail -5 "$out/$name.log"; exit 1; }
    tail -1 "$out/$name.log"
    sslplug eval "$out/$name" --labels 1% > "$out/$name.eval" 2>&1
}
run distill --plugin distill --set distill.teacher="$teacher"
run simclr --plugin simclr
run distill_random --plugin distill --set distill.teacher=random:small
sslplug eval "$teacher" --labels 1% > "$out/teacher.eval" 2>&1
for name in distill simclr distill_random; do
    echo "== $name"
    grep -E "^epoch|kNN top-1 of" "$out/$name.log"
    tail -n 6 "$out/$name.eval"
done
echo "== teacher"
tail -n 6 "$out/teacher.eval"
