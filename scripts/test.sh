#!/usr/bin/env bash
# Install (once) and run the whole test suite. Real-face tests use the LFW folder named by
# FACEID_LFW_DIR; without it they skip. The web page's browser tests need Debian's chromium and
# chromium-driver: installed here when missing and apt-get can (root), else those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test: installing chromium and chromium-driver for the browser tests" >&2
  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
    || echo "test: could not install chromium; the browser tests will skip" >&2
fi
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
