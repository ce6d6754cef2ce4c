"""What each distiller costs: one training step of each method over the floor every feature
distillation pays (one student training step + one teacher backbone forward without grad).
A step here is forward + backward; the optimizer update is the same for every method.
On a CUDA preset (`runtime.device: cuda`) the steps run on the GPU under the spec's bf16
autocast, and each timing waits for the device to finish.

All methods run in one process on the same batch, interleaved round by round, and the median
of each is used, so machine noise hits every method alike. Prints a table of milliseconds and
ratios; `--json` writes them too.

    python -m bench.overhead --preset cpu --rounds 8 --threads 1   # the table's sizes
    python -m bench.overhead --spec configs/smalldigits/hmkd.yaml   # any distill spec
    python -m bench.overhead --preset hituav-gpu --data-root /data/hituav  # real images, GPU
    python -m bench.overhead --preset hituav-gpu --count-ops --rows hmkd   # ops, any machine
    python -m bench.overhead --preset hituav-gpu --profile prof.txt --rows hmkd fgd
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from bench.data import prepare
from bench.presets import (
    PRESETS,
    ROWS,
    Splits,
    is_control,
    row_options,
    student_spec,
    with_data_root,
)
from hmkd_core.data import CocoDetectionDataset, collate_detection, make_small_digits
from hmkd_core.distill import build_distiller, build_response
from hmkd_core.engine.distributed import pick_device
from hmkd_core.engine.module import FrozenTeacher, TrainModule
from hmkd_core.models import build_detector
from hmkd_core.spec import DEFAULT_LEVELS, DistillSpec, TrainSpec, load_spec, teacher_input_scale

# Every distilling row of the table, with the same options (a control's step is its method's).
METHODS: dict[str, DistillSpec] = {
    name: DistillSpec.model_validate(row_options(name))
    for name, row in ROWS.items()
    if row["method"] != "none" and not is_control(name)
}


def _batch(
    spec: TrainSpec, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
    train = spec.data.train
    if not train.annotations.is_file():
        size = spec.student.min_size
        paths = make_small_digits(tempfile.mkdtemp(), train=batch_size, val=1, size=size, seed=0)
        train = type(train)(images=paths["train_images"], annotations=paths["train_annotations"])
    ds = CocoDetectionDataset(train.images, train.annotations)
    images, targets = collate_detection([ds[i] for i in range(batch_size)])
    images = [i.as_subclass(torch.Tensor) for i in images]
    targets = [
        {"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets
    ]
    return images, targets, ds.num_classes


class _Device:
    """Where the steps run, and a clock that waits for that device: CUDA kernels return before
    they finish, so a host timer alone would time the launches, not the work."""

    def __init__(self, spec: TrainSpec) -> None:
        try:  # the trainer's choice of device, `auto` included
            self.device = pick_device(spec.runtime.device, local_rank=0)
        except RuntimeError as e:
            raise SystemExit(str(e)) from e
        self.amp = self.device.type == "cuda" and spec.runtime.amp

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def autocast(self) -> AbstractContextManager:
        # the trainer's own precision: bf16 autocast on CUDA when the spec asks for it
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()


def _module(
    spec: TrainSpec,
    method: DistillSpec | None,
    n: int,
    teacher: FrozenTeacher,
    device: torch.device,
) -> tuple:
    torch.manual_seed(0)
    student = build_detector(spec.student, n).train()
    if method is None:
        module = TrainModule(student)
    else:
        levels = tuple(method.levels or DEFAULT_LEVELS[spec.student.arch])
        distiller = build_distiller(
            method,
            levels=levels,
            student_channels=spec.student.fpn_channels,
            teacher_channels=teacher.out_channels,
        )
        module = TrainModule(student, distiller, teacher, build_response(method))
    module.to(device)
    opt = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    return module, opt


def _forward_backward(
    module: TrainModule, opt: torch.optim.Optimizer, images: list, targets: list, on: _Device
) -> dict[str, Tensor]:
    """Forward and backward of one training step. The weights are never updated: a student
    that moves changes its own proposals and RoI counts, hence the detector's cost, and would
    blur the comparison; the update itself costs the same for every method."""
    with on.autocast():
        losses = module(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return losses


def _step(
    module: TrainModule, opt: torch.optim.Optimizer, images: list, targets: list, on: _Device
) -> float:
    """Seconds of one `_forward_backward`, its losses checked after the clock stops."""
    t0 = on.now()
    losses = _forward_backward(module, opt, images, targets, on)
    elapsed = on.now() - t0
    _check_finite(losses)
    return elapsed


def _check_finite(losses: dict[str, Tensor]) -> None:
    bad = [k for k, v in losses.items() if not torch.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite {bad}: the timing would not be of a real step")


def _setup(spec: TrainSpec, batch_size: int, rows: tuple[str, ...] | None) -> tuple:
    """The device, one batch on it, the teacher, and a (module, optimizer) per run: the
    student alone (`student`) and each of `rows` (default every distilling row)."""
    methods = {k: v for k, v in METHODS.items() if rows is None or k in rows}
    assert spec.teacher is not None, "the spec needs a teacher"
    scale = teacher_input_scale(spec.student, spec.teacher)
    if scale > 1:  # objectness is compared anchor by anchor: no such row reads a larger teacher
        methods = {k: v for k, v in methods.items() if v.response.objectness_weight == 0}
    on = _Device(spec)
    images, targets, n = _batch(spec, batch_size)
    images = [i.to(on.device) for i in images]
    targets = [{k: v.to(on.device) for k, v in t.items()} for t in targets]
    teacher_spec = spec.teacher.model_copy(update={"weights": "none"})
    teacher = FrozenTeacher(build_detector(teacher_spec, n), scale).to(on.device)
    runs = {"student": _module(spec, None, n, teacher, on.device)}
    runs.update({name: _module(spec, m, n, teacher, on.device) for name, m in methods.items()})
    return on, images, targets, teacher, runs


# Ops that hand a device value to the host: on a GPU each one waits for every queued kernel.
_HOST_READS = {
    "aten._local_scalar_dense",  # .item(), bool(t), float(t), `if t:`
    "aten.nonzero",
    "aten.masked_select",
    "aten.equal",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten._unique",
    "aten._unique2",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


def _reads_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an op waits for the device to hand the host a value. Not seen here, since they
    do not pass the dispatcher as ops or copy nothing on a CPU: `.tolist()`, `.cpu()`."""
    name = str(func.overloadpacket)
    if name in _HOST_READS:
        return True
    if name in _INDEXING:  # a boolean index is a nonzero inside the op
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if name == "aten.repeat_interleave" and isinstance(args[0], Tensor):
        return kwargs.get("output_size", args[2] if len(args) > 2 else None) is None
    return False


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.ops += 1
        self.host_reads += _reads_host(func, args, kwargs)
        return func(*args, **kwargs)


def count_ops(
    spec: TrainSpec, *, batch_size: int, rows: tuple[str, ...] | None = None
) -> dict[str, dict[str, int]]:
    """Tensor ops dispatched, and how many hand a value to the host, in one step of each run.

    On a GPU a detector's step is bound by the host: each op costs the host microseconds to
    launch whatever its size, and each host read stalls it until the device catches up. The
    ops a distiller dispatches do not depend on the device, so what it adds to that bill can be
    seen without a GPU. Counted on the CPU (a CUDA spec's autocast casts are left out, and so
    are the copies a GPU makes to and from the host) in the step after one warm-up step, so
    lazily built state is not counted.
    """
    cpu = spec.runtime.model_copy(update={"device": "cpu"})
    on, images, targets, _, runs = _setup(
        spec.model_copy(update={"runtime": cpu}), batch_size, rows
    )
    counts = {}
    for name, (module, opt) in runs.items():
        _step(module, opt, images, targets, on)
        with _OpCounter() as counter:
            _forward_backward(module, opt, images, targets, on)
        counts[name] = {"ops": counter.ops, "host_reads": counter.host_reads}
    return counts


def profile(
    spec: TrainSpec, *, batch_size: int, rows: tuple[str, ...] | None = None, steps: int = 5
) -> str:
    """`torch.profiler` tables of `steps` steps of each run, by device time, host time and
    call count: where a step's time goes, and how many launches and waits it makes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    on, images, targets, _, runs = _setup(spec, batch_size, rows)
    activities = [ProfilerActivity.CPU]
    if on.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    by_device = "self_cuda_time_total" if on.device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name, (module, opt) in runs.items():
        for _ in range(3):  # warm-up: allocator, cuDNN's choice of kernels
            _step(module, opt, images, targets, on)
        times, results = [], []
        with run_profiler(activities=activities) as prof:
            for _ in range(steps):
                t0 = on.now()
                results.append(_forward_backward(module, opt, images, targets, on))
                times.append(on.now() - t0)
        for losses in results:  # checked once the profile is taken: the check reads the host
            _check_finite(losses)
        table = prof.key_averages()
        out.append(f"######## {name}: steps ms {[round(1000 * t, 1) for t in times]}")
        for key, limit in ((by_device, 30), ("self_cpu_time_total", 30), ("count", 20)):
            out.append(table.table(sort_by=key, row_limit=limit, max_name_column_width=60))
    return "\n".join(out)


def measure(
    spec: TrainSpec, *, rounds: int, batch_size: int, rows: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Step times of `rows` (default every distilling row) and the floor, interleaved."""
    on, images, targets, teacher, runs = _setup(spec, batch_size, rows)
    methods = [name for name in runs if name != "student"]
    times: dict[str, list[float]] = {name: [] for name in [*runs, "teacher_forward"]}
    batch = runs["student"][0].student.transform(images)[0].tensors
    for r in range(rounds + 2):  # two warm-up rounds
        for name, (module, opt) in runs.items():
            dt = _step(module, opt, images, targets, on)
            if r >= 2:
                times[name].append(dt)
        t0 = on.now()
        with on.autocast():
            teacher.features(images, batch)
        if r >= 2:
            times["teacher_forward"].append(on.now() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["student"] + med["teacher_forward"]
    return {
        "median_ms": {k: 1000 * v for k, v in med.items()},
        "floor_ms": 1000 * floor,
        "ratio": {k: med[k] / floor for k in methods},
        "rounds": rounds,
        "batch_size": batch_size,
        "image_size": spec.student.min_size,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(on.device) if on.device.type == "cuda" else "cpu",
        "amp": on.amp,
    }


def preset_spec(name: str | None, splits: Splits | None = None) -> TrainSpec:
    """A preset's student and teacher at its sizes; without `splits` a batch is made up."""
    preset = PRESETS[name or "cpu"]
    if splits is None:
        absent = Path(tempfile.mkdtemp()) / "absent"
        pair = (absent / "images", absent / "annotations.json")
        splits = Splits(train=pair, val=pair, tune=pair)
    unused = Path("teacher-weights-unused.pt")
    spec = student_spec(preset, splits, unused, {"method": "hmkd"}, seed=0)
    return TrainSpec.model_validate(spec)


def _print_counts(counts: dict[str, dict[str, int]], json_path: Path | None) -> None:
    base = counts["student"]
    print(f"{'step':<34}{'ops':>8}{'+ops':>8}{'host reads':>12}{'+reads':>8}")
    for name, c in counts.items():
        extra_ops, extra_reads = c["ops"] - base["ops"], c["host_reads"] - base["host_reads"]
        print(f"{name:<34}{c['ops']:>8}{extra_ops:>8}{c['host_reads']:>12}{extra_reads:>8}")
    if json_path:
        json_path.write_text(json.dumps(counts, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="the benchmark preset's sizes")
    src.add_argument("--spec", type=Path, help="a distill spec (its student and teacher)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is steadier on a busy host)"
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="a COCO preset's data set here instead of its usual place (real images, not "
        "a made-up batch)",
    )
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="where splits are kept")
    p.add_argument("--rows", nargs="+", default=None, help="default: every distilling row")
    p.add_argument("--profile", type=Path, default=None, help="write profiler tables here")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="count each step's tensor ops and host reads instead of timing (any machine)",
    )
    args = p.parse_args()
    unknown = sorted(set(args.rows or ()) - set(METHODS))
    if unknown:
        p.error(f"--rows: {unknown} are not distilling rows ({', '.join(METHODS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_root and not args.preset:
        p.error("--data-root needs --preset")
    if args.data_root:
        preset = with_data_root(PRESETS[args.preset], args.data_root)
        splits = prepare(preset, args.work / preset.name / "data")
        spec = preset_spec(args.preset, splits)
    elif args.preset or not args.spec:
        spec = preset_spec(args.preset)
    else:
        spec = load_spec(args.spec)
    batch_size = args.batch_size or spec.schedule.batch_size
    rows = tuple(args.rows) if args.rows else None
    if args.profile:
        args.profile.write_text(profile(spec, batch_size=batch_size, rows=rows))
        return
    if args.count_ops:
        _print_counts(count_ops(spec, batch_size=batch_size, rows=rows), args.json)
        return
    result = measure(spec, rounds=args.rounds, batch_size=batch_size, rows=rows)
    print(
        f"batch {result['batch_size']} x {result['image_size']}px on {result['device']}"
        f"{' (bf16)' if result['amp'] else ''}, {result['threads']} threads, "
        f"median of {result['rounds']} interleaved rounds"
    )
    print(f"{'step':<22}{'ms':>10}{'ratio':>8}")
    for name in ("student", "teacher_forward"):
        print(f"{name:<22}{result['median_ms'][name]:>10.1f}{'':>8}")
    print(f"{'floor':<22}{result['floor_ms']:>10.1f}{1.0:>8.3f}")
    for name, ratio in result["ratio"].items():
        print(f"{name:<22}{result['median_ms'][name]:>10.1f}{ratio:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
