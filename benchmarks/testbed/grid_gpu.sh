#!/usr/bin/env bash
# The testbed grid of benchmarks/results/testbed/README.md (settings fixed there) on one GPU:
# PROCS processes share the runs (`scope-kv eval testbed --rank R --world-size PROCS`); the last
# to finish merges the records and writes the report. Resumable: runs already in OUT_DIR (from
# any device) are skipped, so an interrupted call is finished by running this again.
#
#   benchmarks/testbed/grid_gpu.sh [OUT_DIR]        # default benchmarks/results/testbed
#
# PROCS (default 8) processes; PYTHON (default python3); the checkout's src/ goes on PYTHONPATH.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$REPO/benchmarks/results/testbed}
PROCS=${PROCS:-8}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
# each process issues small kernels from one host thread; more intra-op threads only contend
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
args=(eval testbed --device cuda --budgets 32 128 512 2048 --scale 1 2 --seeds 16 --batch-size 16 --out "$OUT"
      --no-progress --world-size "$PROCS")
echo "$(date -u +%FT%TZ) $PYTHON -m scope_kv.cli ${args[*]} --rank R (R = 0..$((PROCS - 1)))"
start=$(date +%s)
pids=()
for ((rank = 0; rank < PROCS; rank++)); do
  "$PYTHON" -m scope_kv.cli "${args[@]}" --rank "$rank" >"$OUT/rank$rank.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "$(( $(date +%s) - start )) s; status $status"
tail -n 3 "$OUT"/rank*.log
exit $status
