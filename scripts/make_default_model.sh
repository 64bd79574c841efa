#!/usr/bin/env bash
# Reproduce the shipped default model (src/pneumoscan/models/default) from the training split.
#   bash scripts/make_default_model.sh [DATA] [INTENSITY]
# DATA defaults to ../shared/data/chest_xray, INTENSITY to clahe and SEEDS to "0 1" (the shipped model).
# The members are fine-tuned, then averaged in weight space into ONE network (pneumoscan soup, kept only
# if its validation figures hold against its weakest member), exported and calibrated; the ensemble of the
# same members is made too, for comparison (it costs two networks per image).
# Each fine-tune is seeded; on one H200 each took about 50-70 s (12 epochs), on a 2-core CPU
# expect about 15 minutes per epoch. Everything is chosen on the patient-grouped validation split.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/chest_xray}"
INTENSITY="${2:-clahe}"
SEEDS="${SEEDS:-0 1}"
P=".venv/bin/pneumoscan"
mkdir -p runs/default
$P data index "$DATA" --out runs/default/manifest.csv --seed 0          # one split for every member
members=()
for s in $SEEDS; do
  # the v0.1 members normalised intensity before augmenting (--augment-order intensity-then-augment)
  $P finetune runs/default/manifest.csv --out "runs/default/ft-$INTENSITY-s$s" --intensity "$INTENSITY" \
     --seed "$s" --epochs 12 --batch-size 64 --workers 8 --augment-order intensity-then-augment --overwrite
  members+=("runs/default/ft-$INTENSITY-s$s")
done
$P ensemble "${members[@]}" --out runs/default/ensemble --data runs/default/manifest.csv --overwrite
$P soup "${members[@]}" --out runs/default/soup --data runs/default/manifest.csv --overwrite
$P export --model runs/default/soup
$P calibrate --model runs/default/soup --data runs/default/manifest.csv
$P scope-suite --model runs/default/soup --data runs/default/manifest.csv --record --out runs/default/scope-suite
$P robustness --model runs/default/soup --data runs/default/manifest.csv --out runs/default/robustness --n-boot 0
echo "copy runs/default/soup to src/pneumoscan/models/default to ship it"
