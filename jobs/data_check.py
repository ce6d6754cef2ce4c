"""The dataset checks a job's spec gets when it is submitted, not when its turn comes.

Each split is summarised with the loader's own checks (`hmkd_core.data.summary`): annotations
that do not parse, images missing from the folder, file names leading out of it, and a
validation split whose categories differ from training's are refused with the field at fault.
What is legal but likely a mistake (a category without boxes) comes back as warnings. Once
the spec's weights are resolved to files, an exported student trained on other categories than
the split it meets is refused too (`check_weights`).
Summaries are cached by the files' size and modification time: users submit many jobs over one
dataset, and a large annotation file takes seconds to parse.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hmkd_core.data.coco import DatasetError, check_same_categories
from hmkd_core.data.summary import SplitSummary, summarize_split
from hmkd_core.spec import TrainSpec
from jobs.schemas import JobSpec


class DataFieldError(ValueError):
    """A split that cannot be trained on; `field` is its dotted path in the spec."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _cached(
    images: str,
    annotations: str,
    input_size: tuple[int, int],
    _stamps: tuple[tuple[int, int], tuple[int, int]],
) -> SplitSummary:
    return summarize_split(images, annotations, input_size=input_size)


def summary_of(
    images: Path | str, annotations: Path | str, input_size: tuple[int, int]
) -> SplitSummary:
    """`summarize_split`, cached until either path changes."""
    stamps = (_stamp(Path(images)), _stamp(Path(annotations)))
    return _cached(str(images), str(annotations), input_size, stamps)


def _field_of(err: DatasetError, split: str) -> str:
    """Missing or misplaced image files are the images folder's fault; the rest the file's."""
    text = str(err)
    image_side = "not found" in text or "points outside" in text or "images folder" in text
    return f"data.{split}.{'images' if image_side else 'annotations'}"


def check_data(spec: TrainSpec) -> list[str]:
    """Summarise every split of `spec` (DataFieldError for one that would fail the job);
    returns the warnings worth showing the user."""
    input_size = (spec.student.min_size, spec.student.max_size)
    summaries: dict[str, SplitSummary] = {}
    for split in ("train", "val"):
        paths = getattr(spec.data, split)
        if paths is None:
            continue
        try:
            summaries[split] = summary_of(paths.images, paths.annotations, input_size)
        except DatasetError as err:
            raise DataFieldError(_field_of(err, split), str(err)) from None
    if "train" in summaries and getattr(spec, "kind", "train") != "evaluate":
        _check_batch_fits(spec, summaries["train"].images)
    if "train" in summaries and "val" in summaries and spec.data.val is not None:
        try:
            check_same_categories(
                summaries["train"].category_names,
                summaries["val"].category_names,
                spec.data.val.annotations,
            )
        except DatasetError as err:
            raise DataFieldError("data.val.annotations", str(err)) from None
    return [w for split, s in summaries.items() for w in s.warnings(split)]


def _check_batch_fits(spec: TrainSpec, images: int) -> None:
    """Each process trains on its share of the training images in whole batches: a share
    smaller than one batch leaves it nothing to train on, which the trainer refuses when the
    job starts."""
    from hmkd_core.engine.sampler import batches_per_replica

    processes = spec.processes() if isinstance(spec, JobSpec) else spec.runtime.nproc
    if batches_per_replica(images, processes, spec.schedule.batch_size) == 0:
        share = images // processes
        raise DataFieldError(
            "schedule.batch_size",
            f"{images} training image(s) over {processes} process(es) give each process "
            f"{share}, fewer than one batch of {spec.schedule.batch_size}; use a batch_size of "
            f"at most {max(share, 1)} or more images",
        )


def check_weights(spec: TrainSpec, *, evaluate: bool) -> None:
    """Refuse an exported student named as `student.weights` or `teacher.weights` that was
    trained on other categories than the split it meets (data.val for an evaluation, else
    data.train). Another number of them fails the job only when it starts; and where labels
    are compared one by one (an evaluation scores them as the split's classes, the response
    terms match the teacher's class k to the student's) other names would give a wrong result
    with no error. A file still to be written (a teacher job not yet ended) is checked when it
    loads."""
    from hmkd_core.models import WeightsError
    from hmkd_core.models.export import check_trained_on, labels_compared

    split = spec.data.val if evaluate else spec.data.train
    if split is None:
        return
    try:
        summary = summary_of(
            split.images, split.annotations, (spec.student.min_size, spec.student.max_size)
        )
    except DatasetError as err:  # changed on disk since `check_data` read it
        raise DataFieldError(_field_of(err, "val" if evaluate else "train"), str(err)) from None
    categories = [{"id": c.id, "name": c.name} for c in summary.categories]
    for role, model in (("student", spec.student), ("teacher", spec.teacher)):
        if model is None:
            continue
        try:
            same = labels_compared(spec, role, evaluate=evaluate)
            check_trained_on(model.weights, categories, same_classes=same)
        except WeightsError as err:
            raise DataFieldError(f"{role}.weights", str(err)) from None


@functools.lru_cache(maxsize=16)
def _cached_annotations(path: str, _stamp: tuple[int, int]) -> dict[str, Any]:
    from hmkd_core.data import read_annotation_file

    data = read_annotation_file(path)
    return {
        "images": {img["id"]: img for img in data["images"]},
        "categories": {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]},
        "annotations": data["annotations"],
    }


def annotations_of(path: Path | str) -> dict[str, Any]:
    """A split's annotation file, parsed once until it changes, indexed for the API's image
    and sample routes: `images` by id, `categories` id -> name, `annotations` as listed."""
    return _cached_annotations(str(path), _stamp(Path(path)))
