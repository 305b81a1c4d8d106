#!/usr/bin/env bash
# The sd15 GPU measurements that fit in about 5 minutes on one NVIDIA GPU, written to one folder.
#
#   benchmarks/gpu_suite.sh OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds pure-Python wheels to install first without touching the machine's torch:
# at least vilex itself (`pip wheel --no-deps . -w wheels`) and diffusers when the image lacks it
# (`pip download --no-deps diffusers -d wheels`). TensorRT, onnxruntime-gpu and tritonclient are used
# when present and reported as skipped when not. Every step has its own time limit so that one slow
# step (torch.compile) cannot eat the others' time.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [WHEELS_DIR]}
WHEELS=${2:-}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)

# 1. Dependencies
if [ -n "$WHEELS" ]; then
  python -m pip install --no-deps --no-index --quiet "$WHEELS"/*.whl || { echo "could not install $WHEELS/*.whl"; exit 2; }
fi
python - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "diffusers", "transformers", "safetensors", "vilex") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing {missing}: carry them as wheels in WHEELS_DIR")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
skipped=()
for module in tensorrt onnxruntime tritonclient matplotlib psutil; do
  python -c "import $module" 2>/dev/null || skipped+=("$module (not installed)")
done
python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
  || skipped+=("onnxruntime-cuda (no CUDA execution provider)")

export VILEX_CACHE="$OUT/cache"
run() {  # run LIMIT_SECONDS NAME ARGS...: one bench invocation into $OUT/NAME
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s): vilex bench $*"
  if ! timeout "$limit" vilex bench "$@" --out "$OUT/$name"; then
    echo "!! $name did not finish within ${limit}s or failed"; skipped+=("$name (timed out or failed)")
  fi
}

# 2. The sd15 checkpoint (random weights, real shapes), made once.
timeout 100 vilex init "$VILEX_CACHE/sd15-seed0" --preset sd15 >/dev/null 2>&1 || test -f "$VILEX_CACHE/sd15-seed0/model_index.json" \
  || { echo "could not build the sd15 preset"; exit 1; }
CKPT="$VILEX_CACHE/sd15-seed0"

# 3. Stages at batch 1 and 8 in every PyTorch mode; fp32 included as the baseline.
run 80 stages "$CKPT" --backends torch,torch-fp16,torch-bf16,torch-cudagraph --batch-sizes 1,8 --no-e2e --window 0.3 --compare
# 4. End to end: 512x512 (sd15's native size), 50 steps, batch 1, 16 tokens, fp16 eager and CUDA graphs.
run 70 e2e "$CKPT" --backends torch-fp16,torch-cudagraph --stages "" --steps 50 --tokens 16 --e2e-batch 1 --compare
# 5. torch.compile of the UNet alone (compilation dominates; last, so it cannot starve the rest).
run 50 compile "$CKPT" --backends torch-compile --stages unet --batch-sizes 1,8 --no-e2e --window 0.3
# 6. TensorRT / onnxruntime-cuda when present (fp16 export + engine build).
if python -c "import tensorrt" 2>/dev/null; then
  run 240 tensorrt "$CKPT" --backends tensorrt --precision fp16 --batch-sizes 1,8 --steps 50 --compare
fi

echo "== skipped: ${skipped[*]:-nothing}"
printf '%s\n' "${skipped[@]:-}" > "$OUT/skipped.txt"
echo "== done in $(( $(date +%s) - start )) s; results under $OUT/*/results.md"
