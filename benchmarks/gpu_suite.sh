#!/usr/bin/env bash
# The sd15 GPU measurements that fit in about 5 minutes on one NVIDIA GPU, written to one folder.
#
#   benchmarks/gpu_suite.sh [--dry-run] OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds the wheels the GPU host lacks: diffusers (`pip download --no-deps diffusers -d
# wheels`) and vilex (`pip wheel --no-deps . -w wheels`; without one, vilex is built there from this checkout).
# They are installed with `pip install --no-deps --no-index --target OUT_DIR/site`, first on PYTHONPATH and PATH,
# so the machine's torch and site-packages are never touched (benchmarks/gpu_env.sh says why). TensorRT,
# onnxruntime-gpu and tritonclient are used when present and reported as skipped when not. Every step has its own
# time limit so that one slow step (torch.compile) cannot eat the others' time.
# PYTHON (default python3, else python) is the interpreter whose torch is measured.
#
# --dry-run runs every step on CPU, to try the set-up on a machine without a GPU before one is lent: no CUDA
# check, the tiny preset, 2 denoising steps, short windows, and `torch` added to the steps that have only GPU
# backends; `vilex bench` lists the GPU-only backends as skipped, with the reason, in skipped.txt. Every step's
# time limit is then DRY_RUN_LIMIT seconds (default 300; a CPU shared with other work needs more).
#
# Exit status: 0 when every step finished, 1 when a step failed or ran out of time (its figures are missing),
# 2 when the set-up failed (nothing was measured).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/benchmarks/gpu_env.sh"
gpu_env_args benchmarks/gpu_suite.sh "$@"
LOG="$OUT/suite.log"
exec > >(tee -a "$LOG") 2>&1
# Python buffers a pipe: without this, a step killed at its time limit leaves nothing of what it printed in the log.
export PYTHONUNBUFFERED=1
start=$(date +%s)

# 1. Dependencies: the carried wheels, then everything `vilex bench` imports, then the GPU (benchmarks/gpu_env.sh).
gpu_env_install || exit 2
gpu_env_check "$DRY_RUN" torch diffusers transformers safetensors PIL vilex vilex.presets vilex.benchmarks.runner \
  vilex.benchmarks.suite || exit 2
skipped=()
failed=0
for module in tensorrt onnxruntime tritonclient matplotlib psutil; do
  "$PYTHON" -c "import $module" 2>/dev/null || skipped+=("$module (not installed)")
done
"$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
  || skipped+=("onnxruntime-cuda (no CUDA execution provider)")

# What each step measures: the GPU run, or its CPU dry run (same steps and options, tiny sizes).
if [ "$DRY_RUN" = 1 ]; then
  PRESET=tiny STEPS=2 WINDOW=0.05 LIMIT=${DRY_RUN_LIMIT:-300} GPU_ONLY_PLUS="torch,"
else
  PRESET=sd15 STEPS=50 WINDOW=0.3 LIMIT= GPU_ONLY_PLUS=
fi
export VILEX_CACHE="$OUT/cache"
run() {  # run LIMIT_SECONDS NAME ARGS...: one bench invocation into $OUT/NAME
  local limit=${LIMIT:-$1} name=$2; shift 2
  echo "== $name (limit ${limit}s): vilex bench $*"
  if ! timeout "$limit" vilex bench "$@" --out "$OUT/$name"; then
    echo "!! $name did not finish within ${limit}s or failed"; skipped+=("$name (timed out or failed)"); failed=1
  fi
}

# 2. The checkpoint (random weights, real shapes), made once.
CKPT="$VILEX_CACHE/$PRESET-seed0"
if ! test -f "$CKPT/model_index.json"; then
  timeout "${LIMIT:-100}" vilex init "$CKPT" --preset "$PRESET" >"$OUT/init.log" 2>&1 \
    || { tail -20 "$OUT/init.log"; echo "could not build the $PRESET preset (log: $OUT/init.log)"; exit 2; }
fi

# 3. Stages at batch 1 and 8 in every PyTorch mode; fp32 included as the baseline.
run 80 stages "$CKPT" --backends torch,torch-fp16,torch-bf16,torch-cudagraph --batch-sizes 1,8 --no-e2e \
  --window "$WINDOW" --compare
# 4. End to end: 512x512 (sd15's native size), 50 steps, batch 1, 16 tokens, fp16 eager and CUDA graphs.
run 70 e2e "$CKPT" --backends "${GPU_ONLY_PLUS}torch-fp16,torch-cudagraph" --stages "" --steps "$STEPS" --tokens 16 \
  --e2e-batch 1 --compare
# 5. torch.compile of the UNet alone (compilation dominates; last, so it cannot starve the rest).
run 50 compile "$CKPT" --backends "${GPU_ONLY_PLUS}torch-compile" --stages unet --batch-sizes 1,8 --no-e2e \
  --window "$WINDOW"
# 6. TensorRT / onnxruntime-cuda when present (fp16 export + engine build).
if "$PYTHON" -c "import tensorrt" 2>/dev/null; then
  run 240 tensorrt "$CKPT" --backends tensorrt --precision fp16 --batch-sizes 1,8 --steps "$STEPS" --compare
fi

# 7. What did not run, and why: the steps above, then each backend `vilex bench` skipped (results.json).
mapfile -t bench_skipped < <("$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

for results in sorted(Path(sys.argv[1]).glob("*/results.json")):
    for backend, reason in json.loads(results.read_text()).get("skipped", {}).items():
        print(f"{results.parent.name}: {backend} ({reason})")
PY
)
skipped+=(${bench_skipped[@]+"${bench_skipped[@]}"})  # empty arrays trip `set -u` before bash 4.4
echo "== skipped: ${skipped[*]:-nothing}"
printf '%s\n' "${skipped[@]:-}" > "$OUT/skipped.txt"
echo "== done in $(( $(date +%s) - start )) s; results under $OUT/*/results.md"
exit "$failed"
