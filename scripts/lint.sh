#!/usr/bin/env bash
# Lint and format check (ruff; settings in pyproject.toml), then the type check of faceid/ and app/
# (mypy). `ruff format .` and `ruff check --fix .` repair most of what this reports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
bash scripts/setup.sh
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m ruff format --check .
"$VENV/bin/python" -m mypy faceid app
