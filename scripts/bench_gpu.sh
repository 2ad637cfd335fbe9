#!/usr/bin/env bash
# The GPU figures of the README, under Keras' JAX backend: replay of the reference MLP and of
# the compute-bound CNN against the one-program floor and against replay's own programs alone
# (the pipeline's cost), the MLP again at up to 16 checkpoints per program call, the
# callback's training overhead, and reads beside a busy thread.
# Writes bench-out/{mlp,mlp-stack16,cnn,callback,read}.{json,log}, the MLP (whose target is
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
# groups of 8, the middle one about 0.5 s. --profile says where a group's time goes (reading,
# staging, the programs and read-back), so that a miss says which part to work on.
run mlp replay --workload mlp --examples "$mlp" --k 20 --reps "$reps" --skip naive --profile
# Up to 16 checkpoints per program call: half the calls, read-backs and metric-result calls
# (K = 32: four groups of 16, the middle two steady).
run mlp-stack16 replay --workload mlp --examples "$mlp" --k 32 --reps "$reps" --skip naive \
  --skip reused --stack-max 16
run cnn replay --workload cnn --examples "$cnn" --k 12 --reps "$reps" --skip naive
run callback callback --examples "$cb" --epochs 4 --reps "$reps" \
  --variant ReplayCheckpoint --variant ModelCheckpoint
# Reads beside a busy Python thread, on this host's cores: a reader thread vs processes.
run read read --k 32 --reps "$reps" --readers 1 --readers 4
exit $status
