#!/usr/bin/env bash
# The main job on a fresh machine, CPU only, embedded default (no services to install):
# set up, make SmallDigits, start the service, submit a teacher job and then an HMKD distill
# job that names it, follow both, download the distilled student and print its AP and AP_S.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HMKD_DATA_DIR="$PWD/.hmkd"
port=${HMKD_DEMO_PORT:-8765}
export HMKD_API_URL="http://127.0.0.1:$port"
hmkd=.venv/bin/hmkd

data="$HMKD_DATA_DIR/datasets/smalldigits"
if [ ! -f "$data/val/annotations.json" ]; then
  "$hmkd" datasets synth-digits "$data" --train 400 --val 100 --size 256 --seed 0
fi

mkdir -p "$HMKD_DATA_DIR"
"$hmkd" serve --port "$port" >"$HMKD_DATA_DIR/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -INT "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  .venv/bin/python -c "import httpx,sys; httpx.get('$HMKD_API_URL/v1/ready').raise_for_status()" \
    2>/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$HMKD_DATA_DIR/serve.log"; exit 1; }
  sleep 1
done
echo "service up at $HMKD_API_URL (log: $HMKD_DATA_DIR/serve.log)"
echo "watch the jobs in the dashboard: $HMKD_API_URL/ (sign in with the token in $HMKD_DATA_DIR/token)"

teacher=$("$hmkd" submit configs/service/teacher.yaml --follow --quiet)
student=$("$hmkd" submit configs/service/hmkd.yaml --set "teacher.weights=job:$teacher" \
  --follow --quiet)
mkdir -p runs/demo
"$hmkd" download "$student" run/student.pt -o runs/demo/student.pt
.venv/bin/python - "$teacher" "$student" <<'PY'
import sys


from client.sdk import Client
from hmkd_core.models import load_student

with Client() as api:
    t, s = (api.job(j)["latest_eval"] for j in sys.argv[1:3])
model, header = load_student("runs/demo/student.pt")
print(f"teacher job {sys.argv[1]} (resnet34-FPN):      AP {100 * t['AP']:.1f}  AP_S {100 * t['AP_S']:.1f}")
print(f"HMKD student job {sys.argv[2]} (resnet18-FPN): AP {100 * header.metrics['AP']:.1f}  "
      f"AP_S {100 * header.metrics['AP_S']:.1f}")
print(f"downloaded runs/demo/student.pt: a torchvision {type(model).__name__}")
PY
# What distillation buys, from the committed warm-start table (paired seeds; a demo of a few
# hundred iterations is too short to show it on its own).
.venv/bin/python -m bench.headline bench/results/cpu/summary.json
cat <<EOF

Dashboard: $HMKD_API_URL/ (sign in with the token in $HMKD_DATA_DIR/token).
The service stops with this script; to open the demo's jobs in the dashboard again, run
  HMKD_DATA_DIR=$HMKD_DATA_DIR .venv/bin/hmkd serve --port $port
and open $HMKD_API_URL/ (same token).
EOF
