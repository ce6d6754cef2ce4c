#!/usr/bin/env bash
# The library alone, without the service: set up, make SmallDigits, train a teacher,
# distil a student from it with HMKD, and print the student's COCO AP / AP_S.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
hmkd=.venv/bin/hmkd
if [ ! -f data/smalldigits/val/annotations.json ]; then
  "$hmkd" datasets synth-digits data/smalldigits --train 400 --val 100 --size 256 --seed 0
fi
if [ ! -f runs/demo/teacher/student.pt ]; then
  rm -rf runs/demo/teacher
  "$hmkd" train configs/smalldigits/teacher.yaml --out runs/demo/teacher
fi
rm -rf runs/demo/hmkd
"$hmkd" train configs/smalldigits/hmkd.yaml --out runs/demo/hmkd
.venv/bin/python - <<'PY'
import json
t = json.load(open("runs/demo/teacher/eval.json"))
s = json.load(open("runs/demo/hmkd/eval.json"))
print(f"teacher (resnet34-FPN):      AP {100 * t['AP']:.1f}  AP_S {100 * t['AP_S']:.1f}")
print(f"HMKD student (resnet18-FPN): AP {100 * s['AP']:.1f}  AP_S {100 * s['AP_S']:.1f}")
print("student weights: runs/demo/hmkd/student.pt  (hmkd_core.models.load_student)")
PY
