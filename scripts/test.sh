#!/usr/bin/env bash
# Install (once) and run the whole test suite. Real-face tests use the LFW folder named by
# FACEID_LFW_DIR; without it they skip. The web page's browser tests need Debian's chromium and
# chromium-driver, and the PostgreSQL tests Debian's postgresql (a server the tests start in a
# temporary folder): installed here when missing and apt-get can (root), else those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
apt_install() {  # apt_install WHAT PACKAGE...: install when apt-get can (root), else say what skips
  local what=$1
  shift
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "test: installing $* for the $what tests" >&2
    { apt-get install -y -q "$@" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$@" >/dev/null 2>&1; }; } \
      || echo "test: could not install $*; the $what tests will skip" >&2
  fi
}
command -v chromedriver >/dev/null 2>&1 || apt_install browser chromium chromium-driver
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  || apt_install PostgreSQL postgresql
# --durations: the slowest tests, to keep the suite near its 15-minute aim
exec "${VENV:-.venv}/bin/python" -m pytest -q --durations=20 "$@"
