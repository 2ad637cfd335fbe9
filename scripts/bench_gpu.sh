#!/usr/bin/env bash
# The GPU figures of the README, under Keras' JAX backend: replay of the reference MLP (reading
# on the replay's thread, then on 4 reader processes) and of the compute-bound CNN against the
# one-program floor, reads beside a busy thread, and the callback's training overhead.
# Writes bench-out/{mlp,mlp-readers,cnn,callback,read}.{json,log}, the MLP (whose target is
# not met yet) first, so that a run cut short by a time limit keeps it. Arguments scale it
# down for a smoke run:
#   scripts/bench_gpu.sh [OUT_DIR] [MLP_EXAMPLES] [CNN_EXAMPLES] [CALLBACK_EXAMPLES] [REPS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
mlp=${2:-40000}
cnn=${3:-50000}
cb=${4:-40000}
reps=${5:-3}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run() {  # name, then the bench arguments
  local name=$1
  shift
  echo "== $name: $*"
  "$PY" scripts/bench.py --backend jax "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] || { echo "== $name failed ($rc)"; status=1; }
  echo "== $name done at ${SECONDS}s"
}
# K = 20 for the MLP: replay 2K makes five groups of 8, whose middle three give the steady cost
# (a group of the MLP is about 12 ms on an H200, one alone is noisy); K = 12 for the CNN: three
# groups of 8, the middle one about 0.5 s.
run mlp replay --workload mlp --examples "$mlp" --k 20 --reps "$reps" --skip naive
# The same replay reading on 4 reader processes: does taking the reads off the GIL win here?
TRUELOSS_REPLAY_READERS=4 run mlp-readers replay --workload mlp --examples "$mlp" --k 20 \
  --reps "$reps" --skip naive --skip reused
run cnn replay --workload cnn --examples "$cnn" --k 12 --reps "$reps" --skip naive
run callback callback --examples "$cb" --epochs 4 --reps "$reps" \
  --variant ReplayCheckpoint --variant ModelCheckpoint
# Reads beside a busy Python thread, on this host's cores: a reader thread vs processes.
run read read --k 32 --reps "$reps" --readers 1 --readers 4
exit $status
