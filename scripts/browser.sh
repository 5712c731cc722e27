#!/usr/bin/env bash
# What the browser tests (tests/annotation/test_browser.py) need: Debian's chromium and Playwright for Python.
# Why no `playwright install`: the tests drive the distribution's /usr/bin/chromium, so nothing is downloaded
# outside the package managers and the browser gets the distribution's security updates.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PLAYWRIGHT_VERSION=${PLAYWRIGHT_VERSION:-1.65.2}
if [ ! -x /usr/bin/chromium ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
fi
"$VENV/bin/python" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
