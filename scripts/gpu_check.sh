#!/usr/bin/env bash
# What only a CUDA machine can check, in pieces that each write their result to OUT_DIR and
# each have their own time limit, so one piece that hangs or fails leaves the others' results:
#   1. the machine (GPU, driver, torch);
#   2. the CUDA tests: bf16 distillation training, the window attention's kernel and the
#      batched masks against the CPU, two-process NCCL DDP (where two GPUs are visible);
#   3. every distilling row's step over the floor at the GPU preset's sizes, on real images,
#      and a profile of the student's step beside the main methods' (launches, waits, kernels);
#   4. the GPU preset's stages timed on short runs, and the main rows' projected hours.
# Exits non-zero when any piece failed; each piece's exit status ends its NAME.txt.
#
#   scripts/gpu_check.sh OUT_DIR [HITUAV_ROOT]      (PYTHON=... to pick the interpreter)
set -u
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUT_DIR [HITUAV_ROOT]}")
data=$(realpath -m "${2:-$(dirname "$0")/../../shared/datasets/hituav}")
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
failed=0

piece() {  # piece NAME SECONDS COMMAND...: output to NAME.txt, its exit status on the last line
    local name=$1 limit=$2 status
    shift 2
    echo "== $name ($(date -u +%T))"
    timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1
    status=$?
    echo "exit status $status" >>"$out/$name.txt"
    [ "$status" -eq 0 ] || failed=1
    tail -n 3 "$out/$name.txt"
}

piece machine 30 bash -c "nvidia-smi; $py -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.device_count())'"
piece cuda_tests 120 "$py" -m pytest -m needs_cuda tests/hmkd_core/engine/test_cuda.py \
    -p no:cacheprovider -q -rs
piece overhead 120 "$py" -m bench.overhead --preset hituav-gpu --data-root "$data" \
    --rounds 20 --json "$out/overhead.json"
piece profile 120 "$py" -m bench.overhead --preset hituav-gpu --data-root "$data" \
    --rows hmkd fgd "hmkd: SDM only" "hmkd: HM only" --profile "$out/profile.txt"
piece throughput 200 "$py" -m bench.throughput --preset hituav-gpu --data-root "$data" \
    --iterations 60 --rows none mimic fgd mgd hmkd --json "$out/throughput.json"
exit "$failed"
