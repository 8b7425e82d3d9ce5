#!/usr/bin/env bash
# The GPU check, one command, under 5 minutes on one GPU:
#
#     bench/gpu_check.sh            # figures into bench/latest_gpu.json, then one table
#
# 1. bench/gpu_check.py: teacher steps in bf16 autocast + channels_last (checked, timed against
#    float32, host reads counted with torch.cuda.set_sync_debug_mode), pseudo-labeling throughput
#    of the teacher actor's callable against the bare forward, bit-exactness across batch mates.
# 2. The ratios of `make bench` with the teacher on the GPU: bench/train_epoch.py and
#    bench/pseudo_label.py --device cuda (memory and bytes per row come with the latter).
# Each step has its own time limit, so a hang fails the script instead of eating the budget; a
# failed step does not stop the later ones, and the script exits 1 at the end if any failed.
# Without a CUDA device it stops at once with exit status 2. PY=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
JSON=${GPU_CHECK_JSON:-bench/latest_gpu.json}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray's workers import this checkout too

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device visible to torch ($PY); run it on a machine with an NVIDIA" \
       "GPU (python bench/gpu_check.py --device cpu --quick checks the code paths on a CPU)" >&2
  exit 2
fi
start=$SECONDS
failed=()
step() {  # step LIMIT_SECONDS NAME COMMAND...: a failed step is reported, the next ones still run
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  if ! timeout "$limit" "$@"; then
    echo "gpu_check.sh: $name failed or ran past ${limit}s" >&2
    failed+=("$name")
  fi
}
step 120 "gpu_check.py" "$PY" bench/gpu_check.py --device cuda --json "$JSON"
step 150 "train_epoch.py" "$PY" bench/train_epoch.py --device cuda --epochs 3 --repeat 1 \
  --json "$JSON"
step 165 "pseudo_label.py" "$PY" bench/pseudo_label.py --device cuda --num-cpus "$(nproc)" \
  --forward-seconds 3 --json "$JSON"
"$PY" bench/table.py --json "$JSON"
echo "gpu_check.sh: done in $((SECONDS - start)) s"
if ((${#failed[@]})); then
  echo "gpu_check.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
