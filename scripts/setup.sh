#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent.
# torch/torchvision are pinned in pyproject.toml to the releases this machine's pip has on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[dev]'
