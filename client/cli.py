"""`hmkd`: train, evaluate and make data on one machine; submit and follow jobs on the service.

Heavy imports (torch, torchvision) happen inside commands so `hmkd --help` stays instant.
Errors a user can fix (a bad spec, a missing file) print one clear message and exit 2; a
training failure exits 1 with its cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from client.service_cli import app as service_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
datasets_app = typer.Typer(no_args_is_help=True, help="Make datasets.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(service_app)  # submit, jobs, status, logs, cancel, retry, download, queue, serve...
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def train(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML or JSON training spec.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    nproc: Annotated[int | None, typer.Option(help="Processes (GPUs, or gloo on CPU).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = False,
) -> None:
    """Train a detector, or distil a student from a teacher, as SPEC says."""
    from client.console import ConsoleReporter
    from hmkd_core.engine import RunDirError, TrainingError
    from hmkd_core.engine import train as run_training
    from hmkd_core.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
        result = run_training(
            spec, out, reporter=ConsoleReporter(spec.distill.method), resume=resume, nproc=nproc
        )
    except (SpecError, RunDirError, FileNotFoundError) as err:
        _fail(str(err))
    except (TrainingError, FloatingPointError) as err:
        _fail(str(err), code=1)
    except ValueError as err:  # dataset and pairing errors name their file/field
        _fail(str(err))
    console.print(f"{result.status} at iteration {result.iteration}; run directory: {out}")
    if result.metrics:
        _print_metrics(result.metrics)


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="An exported student.pt.")],
    images: Annotated[Path, typer.Option(help="Image folder of a COCO-format split.")],
    annotations: Annotated[Path, typer.Option(help="COCO annotation JSON of that split.")],
    out: Annotated[Path | None, typer.Option(help="Write eval.json here.")] = None,
    batch_size: int = 4,
    device: str = "cpu",
) -> None:
    """Score an exported student on a COCO-format split with pycocotools."""
    import torch

    from hmkd_core.data import CocoDetectionDataset, DatasetError
    from hmkd_core.engine.evaluate import evaluate_detector
    from hmkd_core.evaluation import write_eval_json
    from hmkd_core.models import WeightsError, load_student
    from hmkd_core.spec import EvalSpec

    try:
        detector, header = load_student(model)
        dataset = CocoDetectionDataset(images, annotations)
    except (WeightsError, DatasetError) as err:
        _fail(str(err))
    if dataset.label_to_category_id != header.label_to_category_id:
        _fail(f"{annotations}: categories differ from those {model} was trained on")
    dev = torch.device(device)
    metrics = evaluate_detector(
        detector.to(dev),
        dataset,
        device=dev,
        batch_size=batch_size,
        extra_area_ranges=EvalSpec().extra_area_ranges,
    )
    assert metrics is not None
    _print_metrics(metrics)
    if out is not None:
        write_eval_json(metrics, out)
        console.print(f"wrote {out}")


@datasets_app.command("synth-digits")
def synth_digits(
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    train_images: Annotated[int, typer.Option("--train", help="Training images.")] = 400,
    val_images: Annotated[int, typer.Option("--val", help="Validation images.")] = 100,
    size: Annotated[int, typer.Option(help="Canvas side in pixels.")] = 256,
    seed: int = 0,
) -> None:
    """Make SmallDigits: real handwritten digits as small objects on cluttered canvases."""
    from hmkd_core.data import make_small_digits, synth_digits_stats

    paths = make_small_digits(out, train=train_images, val=val_images, size=size, seed=seed)
    for split in ("train", "val"):
        stats = synth_digits_stats(paths[f"{split}_annotations"])
        console.print(f"{split}: {paths[f'{split}_annotations']}  {json.dumps(stats)}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title="COCO evaluation")
    keys = [k for k in metrics if k.startswith("AP") or k.startswith("AR")]
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row(*("n/a" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k in keys))
    console.print(table)


def main() -> None:
    app()
