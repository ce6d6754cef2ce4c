#!/usr/bin/env bash
# Check the deployment files without a Docker engine (none runs here or in CI).
#
#   scripts/check_deploy.sh              # everything: ~4 minutes, ~6 GB of scratch space
#   scripts/check_deploy.sh --compose    # step 1 alone: seconds
#   scripts/check_deploy.sh --image      # step 2 alone
#   HMKD_CHECK_LINK_TORCH=1 scripts/check_deploy.sh --image
#                                        # torch & co. linked from .venv: ~1 GB, ~3 minutes
#
# 1. docker-compose.yml: tests/deploy validate it against the Compose Specification's JSON
#    schema (check-jsonschema's vendored copy, installed into .venv here if missing) and check
#    what the schema cannot: environment names are Settings fields, the worker reserves GPUs,
#    api/worker wait for the migration, healthchecks, volumes, the Dockerfile's contract.
# 2. The image's install steps: the Dockerfile's `RUN <<'INSTALL'` block, extracted verbatim,
#    runs in a fresh virtual environment on a copy of the build context (the `!` entries of
#    .dockerignore). That is the whole `pip install .` with the pinned torch/torchvision, so it
#    proves the pins resolve and that what the build would install is complete: the block
#    imports the API and worker from outside the source tree, and this script then migrates a
#    scratch SQLite database with the installed `hmkd db upgrade` (migration scripts packaged)
#    and starts the API with the compose file's uvicorn command until /v1/health answers, then
#    fetches the dashboard (`/` and each file it loads) to prove its files were packaged.
# What it cannot check: the apt steps of the Dockerfile (base image, Python 3.11 from a PPA) and
# CUDA itself; deploy/README.md says how to check those on a machine with Docker and a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case "$mode" in
  all | --compose | --image) ;;
  *) echo "usage: $0 [--compose | --image]" >&2; exit 2 ;;
esac
start=$SECONDS
step() { printf '== %s (%ds)\n' "$1" "$((SECONDS - start))"; }

# ---- 1. compose file and Dockerfile contract -------------------------------------------------
if [ "$mode" != --image ]; then
  step "compose: schema and contract tests"
  [ -x .venv/bin/pytest ] || ./scripts/setup.sh
  if [ ! -x .venv/bin/check-jsonschema ]; then
    .venv/bin/python -m pip install --quiet 'check-jsonschema>=0.28'
  fi
  .venv/bin/pytest tests/deploy -q -p no:cacheprovider
  [ "$mode" = --compose ] && { step "done"; exit 0; }
fi

# ---- 2. the image's install steps in a fresh virtual environment --------------------------------
block=$(sed -n "/^RUN <<'INSTALL'\$/,/^INSTALL\$/p" Dockerfile | sed '1d;$d')
if [ -z "$block" ]; then
  echo "error: no RUN <<'INSTALL' ... INSTALL block in Dockerfile; restore its markers" >&2
  exit 1
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/hmkd-deploy.XXXXXX")
api_pid=""
cleanup() {
  if [ -n "$api_pid" ]; then kill "$api_pid" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
# The full install peaks at ~6.0 GB (measured: torch's CUDA build and its nvidia-* libraries are
# ~5.6 GB of it). With less room, the heavy distributions are linked from .venv instead (same
# pinned versions, so pip still checks the pins against them and installs everything else); the
# step says so. Below ~1 GB there is no honest check to run, and it fails naming TMPDIR.
free_mb=$(($(df -Pk "$scratch" | awk 'NR == 2 {print $4}') / 1024))
full_mb=6500 lean_mb=1000
link_heavy=""
if [ "$free_mb" -lt "$lean_mb" ]; then
  echo "error: $scratch has $free_mb MB free; the image's install check needs ~6 GB" \
    "(${lean_mb} MB with torch linked from .venv). Set TMPDIR to a roomier disk." >&2
  exit 1
elif [ "$free_mb" -lt "$full_mb" ] || [ -n "${HMKD_CHECK_LINK_TORCH:-}" ]; then
  if ! .venv/bin/python -c 'import torch, torchvision' 2>/dev/null; then
    echo "error: $scratch has $free_mb MB free, under the ~6 GB of the full install, and there is" \
      "no .venv with torch to link from (run ./scripts/setup.sh, or set TMPDIR to a roomier disk)" >&2
    exit 1
  fi
  link_heavy=1
  echo "note: $scratch has $free_mb MB free (full install ~6 GB; HMKD_CHECK_LINK_TORCH=${HMKD_CHECK_LINK_TORCH:-}):" \
    "torch, torchvision, triton and the nvidia-*/cuda-* libraries are linked from .venv, not installed."
fi

step "build context: the .dockerignore allowlist"
mkdir "$scratch/src"
sed -n 's/^!//p' .dockerignore | while read -r path; do
  if [ ! -e "$path" ]; then
    echo "error: .dockerignore lets in $path, which does not exist" >&2
    exit 1
  fi
  cp -R "$path" "$scratch/src/"
done
find "$scratch/src" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +

venv=$scratch/venv
if [ -n "$link_heavy" ]; then
  step "linking the heavy distributions from .venv into the fresh venv's path"
  python3.11 -m venv "$venv"
  mkdir "$scratch/linked"
  .venv/bin/python - "$scratch/linked" <<'PY'
import importlib.metadata as metadata, os, sys, sysconfig

# Link each top-level entry (package, .libs folder, dist-info) of the heavy distributions; the
# shared namespace folders `nvidia` and `cuda` belong only to distributions linked here.
heavy = {"torch", "torchvision", "triton"}
site = sysconfig.get_paths()["purelib"]
entries = set()
for dist in metadata.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in heavy or name.startswith(("nvidia-", "cuda-")):
        entries.update(f.parts[0] for f in dist.files or () if f.parts[0] != "..")
for entry in sorted(entries):
    os.symlink(os.path.join(site, entry), os.path.join(sys.argv[1], entry))
print(len(entries), "entries linked")
PY
  purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$scratch/linked" >"$purelib/hmkd-check-linked.pth"
fi

step "the Dockerfile's INSTALL block (pip install . with the pinned torch)"
(cd "$scratch/src" && VENV="$venv" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_QUIET=1 sh -c "$block")
if [ -n "$link_heavy" ]; then
  "$venv/bin/python" -c 'import torch, torchvision; print("linked:", torch.__version__, torchvision.__version__)'
fi

step "installed hmkd db upgrade on a scratch SQLite database"
export HMKD_DATA_DIR=$scratch/data
unset HMKD_DATABASE_URL HMKD_BROKER_URL HMKD_ARTIFACTS_DIR HMKD_DATASET_ROOTS
(cd / && "$venv/bin/hmkd" db upgrade)
(cd / && "$venv/bin/hmkd" worker --help >/dev/null)

step "the compose file's API command answers /v1/health and serves the dashboard"
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd / && exec "$venv/bin/uvicorn" api.app:create_app --factory --host 127.0.0.1 --port "$port") \
  >"$scratch/api.log" 2>&1 &
api_pid=$!
if ! "$venv/bin/python" - "$port" <<'PY'; then
import re, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/v1/health"
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            print(url, answer.status, answer.read().decode())
            break
    except OSError as err:
        if time.monotonic() > deadline:
            sys.exit(f"error: the API did not answer {url} within 60 s: {err}")
        time.sleep(0.5)
base = f"http://127.0.0.1:{sys.argv[1]}"
with urllib.request.urlopen(base + "/", timeout=5) as answer:
    page = answer.read().decode()
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"], answer.headers
files = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page)
files += ["/dashboard/js/views/job.js", "/dashboard/vendor/uPlot.LICENSE"]
if len(files) < 7:
    sys.exit(f"error: the dashboard page at {base}/ references too few files: {files}")
for path in files:
    with urllib.request.urlopen(base + path, timeout=5) as answer:
        assert answer.status == 200 and answer.read(), path
print(base + "/", "dashboard and", len(files), "files served")
PY
  cat "$scratch/api.log" >&2
  exit 1
fi
step "done; the install used $(du -sh "$venv" | cut -f1)${link_heavy:+ (torch and the CUDA libraries linked, not counted)}"
