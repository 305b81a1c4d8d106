#!/usr/bin/env bash
# Train the toy world's base (the shipped recipe: VAE, text encoder + UNet, VAE decoder) on one NVIDIA GPU,
# then a ViLex encoder on it, within about 10 minutes of device time.
#
#   benchmarks/gpu_toy_base.sh OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds pure-Python wheels to install first without touching the machine's torch, as
# for benchmarks/gpu_suite.sh: vilex itself (`pip wheel --no-deps . -w wheels`) and diffusers when the image
# lacks it (`pip download --no-deps diffusers -d wheels`); matplotlib is optional (without it the learning
# curve is logged but not plotted). The run is the CPU recipe of vilex/toyworld/weights/MODEL_CARD.md with
# `--device cuda`: the same options and seeds, every random draw from the same CPU generators, so it trains
# the same model up to floating-point differences. Rerun the same command to continue a run that was cut off.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_toy_base.sh OUT_DIR [WHEELS_DIR]}
WHEELS=${2:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/train.log") 2>&1
start=$(date +%s)

if [ -n "$WHEELS" ]; then
  python -m pip install --no-deps --no-index --quiet "$WHEELS"/*.whl || { echo "could not install $WHEELS/*.whl"; exit 2; }
fi
python - <<'PY' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "diffusers", "transformers", "safetensors", "vilex") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing {missing}: carry them as wheels in WHEELS_DIR")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

# 1. The base (the model card's `vilex toyworld train-base` with its default options), on the GPU.
timeout 420 vilex toyworld train-base "$OUT/toy-base" --device cuda || { echo "!! train-base did not finish in 420 s"; exit 1; }
echo "== base done in $(( $(date +%s) - start )) s"
# 2. ViLex on the trained base (the model card's `vilex train` options), on the GPU.
test -d "$OUT/toy-data" || vilex toyworld make-data "$OUT/toy-data" --n 20000
test -d "$OUT/toy-vilex0" || vilex toyworld new-vilex "$OUT/toy-base/pipeline" "$OUT/toy-vilex0"
VILEX_TRAIN=(--data "$OUT/toy-data" --train-vision --vision-lr 3e-4 --pooler-lr 3e-4 --max-steps 1500 --warmup-steps 75
             --batch-size 32 --caption-prob 0.25 --snr-gamma 5 --num-workers 4 --holdout 0 --checkpoint-every 250 --no-progress)
if [ -d "$OUT/vilex" ]; then
  timeout 240 vilex train --resume "$OUT/vilex" || echo "!! vilex train did not finish in 240 s (rerun to continue)"
else
  timeout 240 vilex train "$OUT/toy-vilex0" --out "$OUT/vilex" "${VILEX_TRAIN[@]}" || echo "!! vilex train did not finish in 240 s (rerun to continue)"
fi
echo "== done in $(( $(date +%s) - start )) s; the base's learning curve: $OUT/toy-base/learning_curve.jsonl"
