#!/usr/bin/env bash
# A quantisation-aware copy of a model (default: the shipped one), then its exports and the INT8 gate.
#   bash scripts/make_qat_model.sh [MODEL_DIR] [DATA] [OUT]
# MODEL_DIR defaults to src/pneumoscan/models/default, DATA to ../shared/data/chest_xray, OUT to runs/qat;
# QAT_ARGS adds options of 'pneumoscan qat' (e.g. QAT_ARGS="--feature-weight 0.03 --epochs 5").
# On a 2-core CPU the distillation takes about 17 minutes (3 epochs over the 4,173 training images at
# 224 px); the gate figures of the teacher and of the copy, side by side, go to benchmarks/results/qat-gate.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-src/pneumoscan/models/default}"
DATA="${2:-../shared/data/chest_xray}"
OUT="${3:-runs/qat}"
P=".venv/bin/pneumoscan"
# shellcheck disable=SC2086  # QAT_ARGS is a list of options
$P qat "$MODEL" --out "$OUT" --data "$DATA" --overwrite ${QAT_ARGS:-}  # distil under emulated INT8; threshold on validation
$P export --model "$OUT"                                     # fp32 ONNX graph, parity-checked
$P calibrate --model "$OUT" --data "$DATA"                   # temperature, threshold, sets, out-of-scope gate
.venv/bin/python benchmarks/qat_gate.py "$MODEL" "$OUT" --data "$DATA"   # both gates, pass or fail
$P export --model "$OUT" --int8 --data "$DATA"               # keeps model.int8.onnx only if the gate passes
