"""`bench.reproduce` on the smoke preset: real short runs in their own processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import reproduce

pytestmark = pytest.mark.slow


def test_the_same_spec_trains_the_same_weights_with_or_without_evaluation(
    tmp_path: Path, in_repo: None, capsys: pytest.CaptureFixture[str]
) -> None:
    reproduce.main(["--preset", "smoke", "--iterations", "2", "--work", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("machine: ")
    digests = [line for line in out[1:] if not line.startswith("[bench]")]  # not progress
    runs = {line.split()[0]: line.split()[1:] for line in digests}
    assert list(runs) == ["plain", "repeat", "evaluated", "avx2"]
    assert len(runs["plain"]) == 1  # the reference digest
    assert runs["repeat"][1] == "same" and runs["evaluated"][1] == "same"
    assert runs["avx2"][1] in ("same", "DIFFERENT")  # depends on this CPU's vector width


def test_the_digest_is_of_the_tensors_not_of_the_file(tmp_path: Path) -> None:
    import torch

    from hmkd_core.models import StudentHeader, build_detector, export_student
    from hmkd_core.spec import ModelSpec
    from tests.conftest import tiny_model

    spec = ModelSpec.model_validate(tiny_model())
    model = build_detector(spec, num_classes=3)

    def export(path: Path, ap: float) -> Path:
        header = StudentHeader(spec, 3, [], {}, metrics={"AP": ap})
        return export_student(model, header, path)

    a, b = export(tmp_path / "a.pt", 0.1), export(tmp_path / "b.pt", 0.2)  # other headers
    assert a.read_bytes() != b.read_bytes()
    assert reproduce.weights_digest(a) == reproduce.weights_digest(b)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert reproduce.weights_digest(a) != reproduce.weights_digest(export(b, 0.2))


def test_a_runs_own_environment_reaches_its_process_only(tmp_path: Path, in_repo: None) -> None:
    """The AVX2 variant depends on it: a kernel cap set for one run, not for its neighbours."""
    import json

    from bench.data import prepare
    from bench.presets import PRESETS, base_student_spec
    from bench.runs import Run, run_grid
    from bench.table import data_root

    preset = PRESETS["smoke"]
    spec = reproduce.variants(
        base_student_spec(preset, prepare(preset, data_root(preset, tmp_path))), 1
    )["plain"][0]
    capped = Run("capped", spec, tmp_path / "capped", env={"ATEN_CPU_CAPABILITY": "default"})
    plain = Run("plain", spec, tmp_path / "plain")
    assert run_grid([capped, plain], jobs=2, threads=1) == []

    def capability(run: Run) -> str:
        return json.loads((run.out / "bench.json").read_text())["machine"]["cpu_capability"]

    assert capability(capped) == "DEFAULT"
    assert capability(plain) != "DEFAULT"
