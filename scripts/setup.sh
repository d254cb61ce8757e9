#!/usr/bin/env bash
# Create the virtual environment (VENV, default .venv) and install FaceID into it, once.
# PyTorch is pinned to the release this project is tested with; pip takes it from the local disk
# where a machine caches it, otherwise from PyPI (a CUDA build on x86_64 Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.faceid-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install --quiet -e '.[test,teacher]'
  touch "$stamp"
fi
