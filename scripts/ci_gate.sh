#!/usr/bin/env bash
# CI accuracy gate: the trained ultralight-simplepose model, quantized with `posequant quantize`'s
# defaults (calibrated on coco-mini train), gated against its float export on coco-mini val (68 people).
# Exit 1 when INT8 drifts past the budgets below (README, "CI gate"); skipped when ../shared is absent.
# Uses the .venv that `make test` created. Files go to ${CI_GATE_OUT:-ci-gate-out}/ (the gate report in gate/).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/ultralight-simplepose
DATA=$SHARED/data/coco-mini
OUT=${CI_GATE_OUT:-ci-gate-out}
PQ=${VENV:-.venv}/bin/posequant

if [[ ! -f $MODEL/ultralight_simplepose_coco_256x192.pth || ! -d $DATA ]]; then
  echo "ci gate: skipped ($SHARED has no trained model or coco-mini)"
  exit 0
fi
# Budgets for 68 people: AP (x100) may drop 1 point (measured 0.40 with flip; one person's joints
# move AP by about one point); a joint group (PCK@0.2) 3 points, i.e. two joints of a ~70-joint
# group may flip but not three (one joint is ~1.4 points); INT8 must not be slower than float on
# ONNX Runtime (measured 1.3x for this 2 MB model on a 2-core VNNI CPU).
MAX_DROP=${MAX_DROP:-1.0}
MAX_JOINT_DROP=${MAX_JOINT_DROP:-3.0}
MIN_SPEEDUP=${MIN_SPEEDUP:-1.0}

rm -rf "$OUT" && mkdir -p "$OUT"
set -x
"$PQ" export-pose "$MODEL/ultralight_simplepose_coco_256x192.pth" -o "$OUT/model.onnx" \
  --arch "$MODEL/ultralight_simplepose.py:build_model" --input-size 256x192 --keypoints coco --color rgb \
  --data "$DATA"
"$PQ" quantize "$OUT/model.onnx" --calib "$DATA" --split train -o "$OUT/model.int8.onnx" \
  --report "$OUT/quantize.md" --json "$OUT/quantize.json"
"$PQ" gate --float "$OUT/model.onnx" --int8 "$OUT/model.int8.onnx" --data "$DATA" --split val --backend ort \
  --max-drop "$MAX_DROP" --max-joint-drop "$MAX_JOINT_DROP" --min-speedup "$MIN_SPEEDUP" --runs 50 \
  --report "$OUT/gate"
