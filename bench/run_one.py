"""One benchmark run in its own process:

    python -m bench.run_one SPEC.json OUT_DIR [TUNE_IMAGES TUNE_ANNOTATIONS]

A process per run gives each run its own thread count and a peak-memory figure that is its
own (the process's maximum resident set, and on CUDA the allocator's peak), which a shared
process could not report. Writes `OUT_DIR/bench.json` next to the run's usual files. With a
tuning split, the final student is also evaluated there (`tune_metrics`): defaults are chosen
on those images, and the validation split stays the reported one.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from hmkd_core.data import CocoDetectionDataset
from hmkd_core.engine.evaluate import evaluate_detector
from hmkd_core.engine.run import train
from hmkd_core.models import load_student
from hmkd_core.spec import TrainSpec


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (2, 4):
        raise SystemExit("usage: python -m bench.run_one SPEC.json OUT_DIR [TUNE_IMAGES TUNE_ANN]")
    spec = TrainSpec.model_validate_json(Path(args[0]).read_text())
    out = Path(args[1])
    t0 = time.perf_counter()
    result = train(spec, out)
    wall = time.perf_counter() - t0
    tune_metrics = None
    if len(args) == 4:
        use_cuda = torch.cuda.is_available() and spec.runtime.device != "cpu"
        device = torch.device("cuda" if use_cuda else "cpu")
        tune = CocoDetectionDataset(Path(args[2]), Path(args[3]))
        student, _ = load_student(result.student_path)
        tune_metrics = evaluate_detector(
            student.to(device),
            tune,
            device=device,
            batch_size=spec.eval.batch_size,
            extra_area_ranges=spec.eval.extra_area_ranges,
        )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "status": result.status,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "cuda_peak_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
        ),
        "tune_metrics": tune_metrics,
        "machine": machine(),
    }
    (out / "bench.json").write_text(json.dumps(record, indent=2))


def machine() -> dict[str, str | None]:
    """What a run's floating point depended on besides its spec: the same spec trains other
    weights on another kind of CPU (its vector width picks other kernels, which round
    differently, and hundreds of steps amplify that), so a record says where it was made."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():  # the first processor's block is enough
                break
    # A model name can be as vague as "AMD EPYC": the family and model numbers name the core
    # generation, which is what decides the rounding (two such machines trained other weights)
    generation = f"{fields['cpu family']}/{fields['model']}" if "cpu family" in fields else None
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": generation,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_initialized() else None,
    }


if __name__ == "__main__":
    main()
