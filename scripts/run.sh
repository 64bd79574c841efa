#!/usr/bin/env bash
# The main job on a fresh machine: install, then index + extract + train + evaluate + report on
# ../shared/data/chest_xray when present, else on the public data (downloaded on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
data="${1:-}"
if [ -z "$data" ]; then
  if [ -d ../shared/data/chest_xray ]; then data=../shared/data/chest_xray
  else
    [ -d data/chest_xray ] || .venv/bin/pneumoscan data download --dest data
    data=data/chest_xray
  fi
fi
exec .venv/bin/pneumoscan run "$data" --out runs/main
