#!/usr/bin/env bash
# Install (once) and run the whole test suite. Real-face tests use FACEID_LFW_DIR when it is set
# (or ../shared/data/lfw when it exists); without it they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${FACEID_LFW_DIR:-}" ] && [ -d ../shared/data/lfw ]; then
  export FACEID_LFW_DIR="$(cd ../shared/data/lfw && pwd)"
fi
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
