#!/usr/bin/env bash
# Train the toy world's base (the shipped recipe: VAE, text encoder + UNet, VAE decoder) on one NVIDIA GPU,
# then a ViLex encoder on it, within about 10 minutes of device time (planned, not measured: never run on a GPU;
# the base and ViLex stages have time limits, and a rerun continues where a stage stopped).
#
#   benchmarks/gpu_toy_base.sh [--dry-run] OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds the wheels the GPU host lacks, installed as for benchmarks/gpu_suite.sh (with
# `--no-deps --no-index --target OUT_DIR/site`, first on PYTHONPATH and PATH; benchmarks/gpu_env.sh): diffusers
# (`pip download --no-deps diffusers -d wheels`) and vilex (`pip wheel --no-deps . -w wheels`; without one, vilex is
# built there from this checkout). `vilex train` also needs accelerate and psutil (the GPU host has both); matplotlib
# is optional (without it the learning curve is logged but not plotted). The run is the recipe of
# vilex/toyworld/weights/MODEL_CARD.md with `--device cuda`, from scratch on the current world: the same options and
# seeds, every random draw from the same CPU generators. The shipped base was trained on CPU in stages instead (the
# previous world's base, then `--init-from` it on this world, 4,000 + 3,000 + 3,000 + 3,000 UNet steps, the last 3,000 with
# half of the captions detailed; the decoder 4,000 steps on its own; the model card), so this run trains the same
# design in one go, not the same weights: 8,000 UNet steps with --detailed-captions 0.5 throughout, the decoder
# 4,000 steps, the vision pretraining of the shipped encoder (1,500 steps, every swap a negative, captioning at
# weight 4), then 2,000 ViLex steps (the shipped encoder had 14,000, in six runs on two bases, then its vision model
# fine-tuned on captioning alone by `vilex toyworld tune-vision` and 6,000 more). The shipped
# checkpoint's mixing adapter is not trained here (its stages' time limits already take the 10 minutes): after this
# run, `vilex toyworld make-data DIR --edits --partial-captions` and the model card's `vilex train ... --mix-adapter
# 256 --mix-adapter-words` command on OUT_DIR/vilex/pipeline add it. Its learning curve says how far 8,000 UNet
# steps take shape and place. Rerun the same command to continue a run that was cut off. PYTHON (default python3,
# else python) is the interpreter to use.
#
# --dry-run runs every step on CPU with a few steps of each stage (the options below, then overrides appended:
# the last value of an option wins), to try the set-up on a machine without a GPU; every time limit is then
# DRY_RUN_LIMIT seconds (default 300).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/benchmarks/gpu_env.sh"
gpu_env_args benchmarks/gpu_toy_base.sh "$@"
exec > >(tee -a "$OUT/train.log") 2>&1
# Python buffers a pipe: without this, a step killed at its time limit leaves nothing of what it printed in the log.
export PYTHONUNBUFFERED=1
start=$(date +%s)

gpu_env_install || exit 2
gpu_env_check "$DRY_RUN" torch diffusers transformers safetensors PIL accelerate psutil vilex vilex.toyworld.train_base \
  vilex.training.trainer || exit 2

# The GPU run, or its CPU dry run: the same commands with these overrides appended.
BASE_DRY=() DATA_N=20000 PRETRAIN_DRY=() VILEX_DRY=() BASE_LIMIT=420 VILEX_LIMIT=240
if [ "$DRY_RUN" = 1 ]; then
  BASE_DRY=(--device cpu --num-scenes 64 --vae-steps 2 --unet-steps 2 --decoder-steps 2 --curve-every 0 --warmup-steps 0
            --vae-batch-size 4 --unet-batch-size 4 --checkpoint-every 1 --log-every 1)
  DATA_N=64 PRETRAIN_DRY=(--pretrain-vision 2 --device cpu)
  VILEX_DRY=(--cpu --max-steps 2 --warmup-steps 0 --batch-size 4 --num-workers 1 --checkpoint-every 1 --log-every 1)
  BASE_LIMIT=${DRY_RUN_LIMIT:-300} VILEX_LIMIT=${DRY_RUN_LIMIT:-300}
fi

# 1. The base (the model card's `vilex toyworld train-base`: default options, half of the captions detailed, the
#    decoder's 4,000 steps), on the GPU.
timeout "$BASE_LIMIT" vilex toyworld train-base "$OUT/toy-base" --device cuda --detailed-captions 0.5 --decoder-steps 4000 \
  ${BASE_DRY[@]+"${BASE_DRY[@]}"} \
  || { echo "!! train-base did not finish in $BASE_LIMIT s"; exit 1; }
echo "== base done in $(( $(date +%s) - start )) s"
# 2. ViLex on the trained base (the model card's `vilex train` options), on the GPU.
test -d "$OUT/toy-data" || vilex toyworld make-data "$OUT/toy-data" --n "$DATA_N" || { echo "!! make-data failed"; exit 1; }
# The shipped encoder's vision pretraining (the model card's `new-vilex` options).
test -d "$OUT/toy-vilex0" || vilex toyworld new-vilex --pretrain-vision 1500 --pretrain-all-swaps --pretrain-captioning 4 \
  --device cuda ${PRETRAIN_DRY[@]+"${PRETRAIN_DRY[@]}"} "$OUT/toy-base/pipeline" "$OUT/toy-vilex0" \
  || { echo "!! new-vilex failed"; exit 1; }
VILEX_TRAIN=(--data "$OUT/toy-data" --train-vision --vision-lr 1e-4 --pooler-lr 3e-4 --max-steps 2000 --warmup-steps 60
             --batch-size 32 --caption-prob 0.25 --snr-gamma 5 --num-workers 4 --holdout 0 --checkpoint-every 200 --no-progress
             ${VILEX_DRY[@]+"${VILEX_DRY[@]}"})
status=0
if [ -d "$OUT/vilex" ]; then
  timeout "$VILEX_LIMIT" vilex train --resume "$OUT/vilex" \
    || { echo "!! vilex train did not finish in $VILEX_LIMIT s (rerun to continue)"; status=1; }
else
  timeout "$VILEX_LIMIT" vilex train "$OUT/toy-vilex0" --out "$OUT/vilex" "${VILEX_TRAIN[@]}" \
    || { echo "!! vilex train did not finish in $VILEX_LIMIT s (rerun to continue)"; status=1; }
fi
echo "== done in $(( $(date +%s) - start )) s; the base's learning curve: $OUT/toy-base/learning_curve.jsonl"
exit "$status"
