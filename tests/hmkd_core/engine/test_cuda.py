"""The CUDA paths: bf16 autocast training with distillation, the window attention's kernel and
the batched masks on the GPU against the CPU, NCCL DDP. Skipped without a CUDA device (CI has
none); run on a GPU machine with `pytest -m needs_cuda` (`scripts/gpu_check.sh` does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hmkd_core.distill.attention import WindowCrossAttention
from hmkd_core.distill.masks import batch_masks
from hmkd_core.engine import train
from hmkd_core.models import load_student
from hmkd_core.spec import TrainSpec
from tests.conftest import tiny_model, tiny_spec

pytestmark = [
    pytest.mark.needs_cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _distill_spec(paths: dict, teacher: Path, **runtime: object) -> TrainSpec:
    return tiny_spec(
        paths,
        teacher=tiny_model(backbone="resnet34", fpn_channels=32, weights=str(teacher)),
        distill={"method": "hmkd"},
        runtime={"device": "cuda", "amp": True, **runtime},
    )


def test_bf16_distillation_trains_and_exports_a_cpu_loadable_student(
    tiny_digits: dict, tiny_teacher: Path, tmp_path: Path
) -> None:
    result = train(_distill_spec(tiny_digits, tiny_teacher), tmp_path)
    assert result.status == "succeeded"
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert records and all("NaN" not in r and "Infinity" not in r for r in records)
    model, _ = load_student(tmp_path / "student.pt")  # weights mapped to the CPU
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_window_attention_on_the_gpu_matches_the_cpu() -> None:
    torch.manual_seed(0)
    attend = WindowCrossAttention(16, 32, window=3, heads=4)
    query, source = torch.randn(2, 32, 12, 10), torch.randn(2, 16, 12, 10)
    on_cpu = attend(query, source)
    on_gpu = attend.cuda()(query.cuda(), source.cuda()).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4, rtol=1e-4)


def test_batched_masks_on_the_gpu_match_the_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = []
    for n in (5, 0, 40, 1):
        xy = torch.rand(n, 2, generator=g) * 120
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 0.5], dim=1))
    on_cpu = batch_masks(boxes, (32, 40), stride=4)
    on_gpu = batch_masks(boxes, (32, 40), stride=4, device="cuda", max_elements=4000)
    assert all(torch.equal(c, d.cpu()) for c, d in zip(on_cpu, on_gpu, strict=True))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_process_nccl_ddp(tiny_digits: dict, tiny_teacher: Path, tmp_path: Path) -> None:
    result = train(_distill_spec(tiny_digits, tiny_teacher, nproc=2), tmp_path)
    assert result.status == "succeeded"
