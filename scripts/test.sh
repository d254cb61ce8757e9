#!/usr/bin/env bash
# Install (once) and run the whole test suite. Real-face tests use the LFW folder named by
# FACEID_LFW_DIR; without it they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
