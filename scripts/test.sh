#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
# System packages: Debian's chromium for the real-browser test (no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "warning: /usr/bin/chromium is missing and cannot be installed here: the browser test will be skipped" >&2
  fi
fi
bash scripts/install.sh test
export PNEUMOSCAN_ARTIFACTS="${PNEUMOSCAN_ARTIFACTS:-$PWD/artifacts}"
mkdir -p "$PNEUMOSCAN_ARTIFACTS"
if [ "${CI:-}" = "true" ]; then export PNEUMOSCAN_REQUIRE_BROWSER=1; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
