# The set-up shared by benchmarks/gpu_suite.sh and benchmarks/gpu_toy_base.sh (sourced, not run): the carried
# wheels, then the check that everything a script imports is there and that a GPU is (or, in a dry run, not).
# Expects REPO (the checkout these scripts are in); gpu_env_args sets DRY_RUN, OUT, WHEELS and PYTHON.

# gpu_env_args SCRIPT [--dry-run] OUT_DIR [WHEELS_DIR]: the scripts' common arguments. OUT and WHEELS become
# absolute (they go on PYTHONPATH and PATH), and the script continues in OUT: from the repository root,
# `python -c` would import the checkout's vilex/ instead of the carried wheel.
gpu_env_args() {
  local script=$1; shift
  DRY_RUN=0
  if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
  OUT=${1:?usage: $script [--dry-run] OUT_DIR [WHEELS_DIR]}
  WHEELS=${2:-}
  PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
  mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
  if [ -n "$WHEELS" ]; then WHEELS=$(cd "$WHEELS" && pwd) || exit 2; fi
  cd "$OUT" || exit 2
}

# gpu_env_install: the wheels in WHEELS into OUT/site, first on PYTHONPATH and PATH. `--target` into a fresh folder
# leaves the machine's torch and site-packages alone (a system Python may be externally managed or read-only), and a
# rerun runs the wheels just carried: pip keeps an installed package of the same version ("already installed with
# the same version as the provided wheel"), so an install into site-packages would keep the old vilex 0.1.0.
# Without a vilex wheel in WHEELS, vilex is built here from REPO, offline, with the machine's setuptools: the wheel
# repeats the checkout's 26 MiB of toy weights, and the two together nearly fill the 64 MiB a device call carries.
gpu_env_install() {
  [ -n "$WHEELS" ] || return 0
  local wheels=("$WHEELS"/*.whl)
  if ! compgen -G "$WHEELS/vilex-*.whl" >/dev/null; then
    # From a copy: setuptools builds in the source folder, and a build/ left there by an older build leaks files.
    rm -rf "$OUT/src" "$OUT/built" && mkdir -p "$OUT/src"
    cp -r "$REPO"/{pyproject.toml,README.md,vilex,export,benchmarks,triton_repo} "$OUT/src/" || return 2
    find "$OUT/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    echo "building vilex from $REPO (no vilex wheel in $WHEELS)"
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-index --quiet -w "$OUT/built" "$OUT/src" \
      || { echo "could not build vilex here: carry its wheel in $WHEELS (pip wheel --no-deps . -w wheels)"; return 2; }
    wheels+=("$OUT"/built/vilex-*.whl)
  fi
  rm -rf "$OUT/site"
  "$PYTHON" -m pip install --no-deps --no-index --quiet --target "$OUT/site" "${wheels[@]}" \
    || { echo "could not install ${wheels[*]}"; return 2; }
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$OUT/site/bin:$PATH"
}

# gpu_env_check DRY_RUN MODULE...: every MODULE imports (a missing one, or a missing dependency of one, is named
# before anything runs), then a CUDA GPU is there, or DRY_RUN is 1.
gpu_env_check() {
  "$PYTHON" - "$@" <<'PY'
import importlib
import importlib.util  # `import importlib` alone does not load importlib.util (a fresh Python 3.12 has not)
import sys

dry_run, modules = sys.argv[1] == "1", sys.argv[2:]
missing = sorted({m.split(".")[0] for m in modules if importlib.util.find_spec(m.split(".")[0]) is None})
if missing:
    sys.exit(f"missing {missing}: carry them as wheels in WHEELS_DIR")
for module in modules:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:  # also importlib.metadata's PackageNotFoundError (diffusers checks requests)
        sys.exit(f"{module}: a dependency is missing ({error}): carry it as a wheel in WHEELS_DIR")
import diffusers
import torch
import vilex

print("vilex from", vilex.__file__, "| diffusers", diffusers.__version__)
if dry_run:
    print("dry run on CPU | torch", torch.__version__, "| CUDA build" if torch.version.cuda else "| CPU build")
elif not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch")
else:
    print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
}
