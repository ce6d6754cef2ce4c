"""Initial loss magnitudes of each distiller next to the detection loss.

The distillation losses are sums of squared FPN differences, so their scale follows the
teacher's feature magnitude; this prints, for a trained teacher and a fresh student on the
first 16 training images, the mean of each loss group per batch. The default method weights in
`hmkd_core/spec.py` were chosen so each method's total starts near the detection loss.

    python -m bench.calibrate --teacher runs/demo/teacher/student.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hmkd_core.data import CocoDetectionDataset, collate_detection
from hmkd_core.distill import build_distiller
from hmkd_core.engine.module import DEFAULT_LEVELS, FrozenTeacher, TrainModule
from hmkd_core.models import build_detector
from hmkd_core.spec import DistillSpec, load_spec


def loss_groups(
    spec_path: Path, teacher_path: Path, batches: int = 8
) -> dict[str, dict[str, float]]:
    spec = load_spec(spec_path)
    assert spec.teacher is not None, "the spec needs a teacher"
    ds = CocoDetectionDataset(spec.data.train.images, spec.data.train.annotations)
    weights = spec.teacher.model_copy(update={"weights": str(teacher_path)})
    teacher = FrozenTeacher(build_detector(weights, ds.num_classes))
    levels = tuple(spec.distill.levels or DEFAULT_LEVELS[spec.student.arch])
    out: dict[str, dict[str, float]] = {}
    for method in ("mimic", "fgd", "mgd", "hmkd"):
        torch.manual_seed(0)
        student = build_detector(spec.student, ds.num_classes).train()
        distiller = build_distiller(
            DistillSpec(method=method),
            levels=levels,
            student_channels=spec.student.fpn_channels,
            teacher_channels=teacher.out_channels,
        )
        module = TrainModule(student, distiller, teacher)
        sums: dict[str, float] = {}
        with torch.no_grad():
            for b in range(batches):
                images, targets = collate_detection([ds[j] for j in (2 * b, 2 * b + 1)])
                images = [i.as_subclass(torch.Tensor) for i in images]
                targets = [
                    {"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]}
                    for t in targets
                ]
                for name, value in module(images, targets).items():
                    group = (
                        name.removeprefix("distill.loss_").rsplit("_", 1)[0]
                        if name.startswith("distill.")
                        else "detection"
                    )
                    sums[group] = sums.get(group, 0.0) + float(value) / batches
        out[method] = sums
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, default=Path("configs/smalldigits/hmkd.yaml"))
    p.add_argument("--teacher", type=Path, required=True)
    args = p.parse_args()
    for method, groups in loss_groups(args.spec, args.teacher).items():
        print(method, "  ".join(f"{k} {v:.3g}" for k, v in groups.items()))


if __name__ == "__main__":
    main()
