#!/usr/bin/env bash
# The whole one-GPU measurement, from a fresh checkout, in at most 8 minutes on an H200:
#
#   bash scripts/device_check.sh [--smoke] [--out PATH]
#
# Installs what is missing without touching a working GPU jax (the GPU images ship jax with its
# CUDA plugin: reinstalling it would replace a matched set of wheels), then runs
# scripts/device_check.py, which writes results/device_check.json (--smoke, or no GPU:
# results/device_check_cpu_smoke.json) and prints a table; a part that fails is recorded there
# and the exit status stays 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TOTAL_S=465  # device_check.py's budget; what installing takes here comes out of it

smoke=0
for arg in "$@"; do [[ $arg == --smoke ]] && smoke=1; done

gpu_jax=0
"$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null && gpu_jax=1
runnable() { "$PYTHON" -c "import edit_jax.program, edit_jax.inspect_hlo" 2>/dev/null; }

if ((gpu_jax)); then
  if ! runnable; then  # the project's other dependencies, with jax and jaxlib pinned as they are
    pins=$(mktemp)
    "$PYTHON" -c "import jax, jaxlib; print(f'jax=={jax.__version__}\njaxlib=={jaxlib.__version__}')" >"$pins"
    "$PYTHON" -m pip install -q -e . -c "$pins" || echo "device_check.sh: pip install failed" >&2
    rm -f "$pins"
  fi
elif ((!smoke)) && nvidia-smi -L >/dev/null 2>&1; then  # a GPU, but no jax that uses it
  "$PYTHON" -m pip install -q -e ".[gpu]" || echo "device_check.sh: pip install failed" >&2
elif ! runnable; then
  "$PYTHON" -m pip install -q -e . || echo "device_check.sh: pip install failed" >&2
fi

budget=()
((smoke)) || budget=(--total-s $((TOTAL_S - SECONDS)))
exec "$PYTHON" scripts/device_check.py "$@" "${budget[@]}"
