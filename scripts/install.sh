#!/usr/bin/env bash
# Create .venv and install pneumoscan into it (editable). Usage: scripts/install.sh [EXTRAS]
#   EXTRAS: "" for the tool, "test" for the test suite (adds pytest, playwright, DICOM codecs).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
