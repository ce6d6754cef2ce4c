"""`hmkd` as a user runs it: make data, distil, evaluate; errors are one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client.cli import app
from tests.conftest import export_tiny_student, tiny_model, tiny_spec_dict

runner = CliRunner()


def test_synth_digits_command(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "datasets",
            "synth-digits",
            str(tmp_path / "d"),
            "--train",
            "3",
            "--val",
            "2",
            "--size",
            "64",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "d" / "train" / "annotations.json").read_text())
    assert len(data["images"]) == 3


@pytest.mark.slow
def test_train_distil_and_eval_end_to_end(
    tiny_digits: dict, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = tiny_spec_dict(
        tiny_digits,
        teacher=tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher)),
        distill={"method": "hmkd"},
        schedule={"iterations": 24, "lr": 0.02, "warmup_iters": 4},
        eval={"every": 12},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(spec_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "AP_S" in res.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls
    assert any("distill.loss_hm_p2" in r.get("losses", {}) for r in records)
    assert sum("eval" in r for r in records) == 2  # at 12 and at the end
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(out / "student.pt"),
            "--images",
            str(tiny_digits["val_images"]),
            "--annotations",
            str(tiny_digits["val_annotations"]),
            "--out",
            str(tmp_path / "e.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        json.loads((tmp_path / "e.json").read_text())["AP"]
        == json.loads((out / "eval.json").read_text())["AP"]
    )


def test_eval_refuses_a_student_whose_categories_have_other_names(
    tiny_digits: dict, tmp_path: Path
) -> None:
    """Only the label -> id map was compared: the same ids named otherwise were scored."""
    ours = json.loads(Path(tiny_digits["val_annotations"]).read_text())["categories"]
    names = [c["name"] for c in reversed(ours)]
    theirs = [{"id": c["id"], "name": name} for c, name in zip(ours, names, strict=True)]
    path = export_tiny_student(tmp_path / "s.pt", theirs)
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(path),
            "--images",
            str(tiny_digits["val_images"]),
            "--annotations",
            str(tiny_digits["val_annotations"]),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "trained on categories" in res.output


def test_bad_spec_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "data": {"train": {"images": "i", "annotations": "a.json"}},
                "student": {"backbone": "vgg"},
            }
        )
    )
    res = runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "student.backbone" in res.output


def test_missing_dataset_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "data": {"train": {"images": "img", "annotations": "nope.json"}},
                "student": tiny_model(),
            }
        )
    )
    res = runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "nope.json" in res.output
