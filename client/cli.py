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
datasets_app = typer.Typer(
    no_args_is_help=True, help="Upload, list and inspect the service's datasets; make SmallDigits."
)
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
    from hmkd_core.models.export import check_trained_on
    from hmkd_core.spec import EvalSpec

    try:
        detector, _header = load_student(model)
        dataset = CocoDetectionDataset(images, annotations)
        check_trained_on(model, dataset.categories, same_classes=True)
    except (WeightsError, DatasetError) as err:
        _fail(str(err))
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


def _pack(folder: Path, into: Path) -> Path:
    """A folder as a tar (images are compressed already): same files, same bytes, so an
    interrupted upload of the same folder resumes."""
    import tarfile

    archive = into / f"{folder.resolve().name}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                info = tar.gettarinfo(path, arcname=path.relative_to(folder).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    return archive


def _upload_state() -> Path:
    from jobs.settings import Settings

    return Settings().data_dir / "uploads.json"


@datasets_app.command("upload")
def datasets_upload(
    name: Annotated[str, typer.Argument(help="Dataset name; each upload is a new version.")],
    path: Annotated[
        Path,
        typer.Argument(
            help="A zip/tar of a COCO export, or its folder: train/annotations.json + "
            "train/images/ (and val/ likewise), or annotations.json + images/."
        ),
    ],
    chunk_mib: Annotated[int, typer.Option(min=1, max=1024, help="MiB per request.")] = 8,
) -> None:
    """Upload a COCO export to the service; run it again to resume an interrupted upload."""
    import tempfile

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from client.service_cli import _api, _client

    if not path.exists():
        _fail(f"{path}: no such file or folder")
    state_file = _upload_state()
    with tempfile.TemporaryDirectory() as scratch:
        archive = _pack(path, Path(scratch)) if path.is_dir() else path
        st = archive.stat()
        key = f"{path.resolve()}|{st.st_size}|{name}"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}

        def remember(upload_id: str) -> None:
            state[key] = upload_id
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps(state))

        bar = Progress(
            "[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err_console,
        )  # fmt: skip
        with _client() as client, bar:
            task = bar.add_task(f"upload {name}", total=st.st_size)
            made = _api(
                client.upload_dataset,
                name,
                archive,
                chunk_bytes=chunk_mib << 20,
                resume_from=state.get(key),
                on_start=remember,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        state.pop(key, None)
        state_file.write_text(json.dumps(state))
    console.print(f"dataset {made['ref']} ({made['sha256'][:12]}); name it in a spec as")
    console.print(f"  dataset: {made['ref']}")
    _print_dataset(made)


@datasets_app.command("list")
def datasets_list() -> None:
    """Your team's datasets, every version."""
    from client.service_cli import _api, _client

    with _client() as client:
        found = _api(client.datasets)
    table = Table()
    for column in ("dataset", "source", "train images", "train boxes", "val images", "created"):
        table.add_column(column)
    for d in found:
        train, val = d["stats"].get("train", {}), d["stats"].get("val", {})
        table.add_row(
            d["ref"], d["source"], str(train.get("images", "")), str(train.get("boxes", "")),
            str(val.get("images", "–")), d["created_at"],
        )  # fmt: skip
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    ref: Annotated[str, typer.Argument(help="name or name@version")],
    min_size: Annotated[
        int | None, typer.Option(help="Also count box sizes at this input size (shorter side).")
    ] = None,
    max_size: Annotated[int | None, typer.Option(help="Cap on the longer side.")] = None,
) -> None:
    """A dataset's splits: images, boxes per category, box sizes (COCO ranges)."""
    from client.service_cli import _api, _client

    with _client() as client:
        found = _api(client.dataset, ref, min_size=min_size, max_size=max_size)
    console.print(f"{found['ref']}  {found['source']}  sha256 {found['sha256']}")
    _print_dataset(found)


def _print_dataset(d: dict[str, Any]) -> None:
    """Box sizes as COCO measures them: AP_S counts boxes under 32 px at native size."""
    for split, s in d["stats"].items():
        cats = ", ".join(f"{c['name']} {c['boxes']}" for c in s["categories"])
        console.print(f"[bold]{split}[/]: {s['images']} images, {s['boxes']} boxes ({cats})")
        table = Table(box=None)
        table.add_column("box size")
        bins = list(s["native_sizes"])
        for b in bins:
            table.add_column(b, justify="right")
        table.add_row("native", *(str(s["native_sizes"][b]) for b in bins))
        if s.get("input_sizes"):
            table.add_row("at input", *(str(s["input_sizes"][b]) for b in bins))
        console.print(table)
        for c in s["categories"]:
            if c["boxes"] == 0:
                console.print(f"[yellow]warning:[/] category {c['id']} {c['name']!r} has no boxes")


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title="COCO evaluation")
    keys = [k for k in metrics if k.startswith("AP") or k.startswith("AR")]
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row(*("n/a" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k in keys))
    console.print(table)


def main() -> None:
    app()
