"""`/v1/datasets`: upload a COCO export in resumable chunks, or register a server folder
(administrators), then read what each version holds: stats, sample images and their boxes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminUser, CurrentUser, SessionDep, SettingsDep
from api.schemas import Problem
from hmkd_core.spec import StrictModel
from jobs import datasets
from jobs.data_check import annotations_of, summary_of
from jobs.lifecycle import InvalidJob, NotFound
from jobs.models import Dataset

router = APIRouter(prefix="/datasets", tags=["datasets"])

_ERRORS = {
    401: {"model": Problem, "description": "Missing or unknown token."},
    404: {"model": Problem, "description": "No such dataset or upload in your team."},
}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
_REF = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}(@[0-9]{1,9})?$"


class UploadStart(StrictModel):
    name: str = Field(pattern=_NAME, description="The dataset's name; a new version of it.")
    size: int = Field(ge=1, description="Bytes of the whole archive (zip or tar).")


class UploadPublic(BaseModel):
    id: str
    name: str
    size: int
    offset: int = Field(description="Bytes received: the next chunk starts here.")


class SplitPaths(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: str = Field(min_length=1, max_length=4096)
    annotations: str = Field(min_length=1, max_length=4096)


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    train: SplitPaths
    val: SplitPaths | None = None


class DatasetPublic(BaseModel):
    name: str
    version: int
    ref: str = Field(description="What a spec's `dataset` names: name@version.")
    sha256: str = Field(description="Of the uploaded archive, or of a registered split's files.")
    source: str = Field(description="upload or path")
    size: int = Field(description="Bytes stored on the server (0 for a registered folder).")
    stats: dict[str, Any] = Field(
        description="Per split: images, boxes, categories with their box counts, and box sizes "
        "(COCO area ranges) at native size and, when asked, at an input size."
    )
    created_at: str

    @classmethod
    def of(cls, d: Dataset, stats: dict[str, Any] | None = None) -> DatasetPublic:
        return cls(
            name=d.name,
            version=d.version,
            ref=f"{d.name}@{d.version}",
            sha256=d.sha256,
            source=d.source,
            size=d.size,
            stats=stats if stats is not None else d.stats,
            created_at=d.created_at.isoformat(timespec="seconds"),
        )


class SampleBox(BaseModel):
    bbox: list[float] = Field(description="[x, y, width, height] in pixels.")
    category: str


class Sample(BaseModel):
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: list[SampleBox]


def _upload_public(u: Any) -> UploadPublic:
    return UploadPublic(id=u.id, name=u.name, size=u.size, offset=u.received)


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadPublic,
    summary="Start a dataset upload",
    responses={**_ERRORS, 422: {"model": Problem, "description": "Bad name or size."}},
)
def start_upload(
    body: UploadStart, session: SessionDep, user: CurrentUser, settings: SettingsDep
) -> UploadPublic:
    """Announce an archive of `size` bytes; send it with PUT .../uploads/{id}?offset=N."""
    return _upload_public(datasets.start_upload(session, user, body.name, body.size, settings))


@router.get(
    "/uploads/{upload_id}",
    response_model=UploadPublic,
    summary="An upload's offset",
    responses=_ERRORS,
)
def get_upload(upload_id: str, session: SessionDep, user: CurrentUser) -> UploadPublic:
    """How much has arrived: an interrupted client resumes from `offset`."""
    return _upload_public(datasets.get_upload(session, user, upload_id))


@router.put(
    "/uploads/{upload_id}",
    response_model=UploadPublic,
    summary="Send a chunk",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses={
        **_ERRORS,
        409: {"model": Problem, "description": "`offset` is not where the upload stands."},
        413: {"model": Problem, "description": "Chunk over HMKD_UPLOAD_CHUNK_BYTES."},
    },
)
async def put_chunk(
    upload_id: str,
    request: Request,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Where this chunk starts.")],
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
) -> UploadPublic:
    """Append the body at `offset`, which must equal the bytes received so far."""
    import anyio

    data = await request.body()
    upload = await anyio.to_thread.run_sync(datasets.get_upload, session, user, upload_id)
    await anyio.to_thread.run_sync(datasets.write_chunk, session, upload, offset, data, settings)
    return _upload_public(upload)


@router.post(
    "/uploads/{upload_id}/complete",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Finish an upload: check it and make the dataset",
    responses={
        **_ERRORS,
        409: {"model": Problem, "description": "Not every byte has arrived."},
        422: {"model": Problem, "description": "The archive or its COCO splits are not usable."},
    },
)
def complete_upload(
    upload_id: str, session: SessionDep, user: CurrentUser, settings: SettingsDep
) -> DatasetPublic:
    """Unpack, check each split as the loader would, and store the next version of the name."""
    upload = datasets.get_upload(session, user, upload_id)
    return DatasetPublic.of(datasets.finish_upload(session, user, upload, settings))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Register a server folder as a dataset (administrators)",
    responses={**_ERRORS, 403: {"model": Problem, "description": "Not an administrator."}},
)
def register(
    body: Registration, session: SessionDep, user: AdminUser, settings: SettingsDep
) -> DatasetPublic:
    """Splits already on the server, under the dataset roots, as the next version of `name`."""
    splits = {"train": body.train.model_dump()}
    if body.val is not None:
        splits["val"] = body.val.model_dump()
    return DatasetPublic.of(datasets.register_path(session, user, body.name, splits, settings))


@router.get(
    "", response_model=list[DatasetPublic], summary="Your team's datasets", responses=_ERRORS
)
def list_datasets(session: SessionDep, user: CurrentUser) -> list[DatasetPublic]:
    """Every version, by name, newest version first."""
    return [DatasetPublic.of(d) for d in datasets.list_datasets(session, user)]


@contextmanager
def _as_checked() -> Iterator[None]:
    """Around a read of a split's files, checked when the dataset was made: one changed on
    disk since (a registered folder is the server's) is a 404 that says what is wrong."""
    from hmkd_core.data.coco import DatasetError

    try:
        yield
    except DatasetError as err:
        raise NotFound(str(err)) from None


def _get(session: Any, user: Any, ref: str) -> Dataset:
    try:
        return datasets.find(session, user, ref)
    except InvalidJob as err:
        raise NotFound(err.message) from None


@router.get("/{ref}", response_model=DatasetPublic, summary="One dataset", responses=_ERRORS)
def get_dataset(
    ref: str,
    session: SessionDep,
    user: CurrentUser,
    min_size: Annotated[
        int | None, Query(ge=32, le=4096, description="Input size, shorter side.")
    ] = None,
    max_size: Annotated[
        int | None, Query(ge=32, le=8192, description="Cap on the longer side.")
    ] = None,
) -> DatasetPublic:
    """Stats of each split; with `min_size` (and `max_size`) also box sizes at that input."""
    dataset = _get(session, user, ref)
    if min_size is None:
        return DatasetPublic.of(dataset)
    size = (min_size, max(max_size or 1333, min_size))
    with _as_checked():
        stats = {
            split: summary_of(paths["images"], paths["annotations"], size).as_dict()
            for split, paths in dataset.splits.items()
        }
    return DatasetPublic.of(dataset, stats)


def _split(dataset: Dataset, split: str) -> dict[str, str]:
    if split not in dataset.splits:
        raise NotFound(f"dataset {dataset.name}@{dataset.version} has no {split} split")
    return dataset.splits[split]


@router.get(
    "/{ref}/samples",
    response_model=list[Sample],
    summary="Sample images and boxes",
    responses=_ERRORS,
)
def samples(
    ref: str,
    session: SessionDep,
    user: CurrentUser,
    split: Annotated[str, Query(pattern="^(train|val)$")] = "train",
    n: Annotated[int, Query(ge=1, le=24)] = 6,
) -> list[Sample]:
    """The first `n` images with boxes, each with its boxes and their categories."""
    paths = _split(_get(session, user, ref), split)
    with _as_checked():
        data = annotations_of(paths["annotations"])
    names = data["categories"]
    boxes: dict[int, list[SampleBox]] = {}
    for ann in data["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(
            SampleBox(bbox=[float(v) for v in ann["bbox"]], category=names[ann["category_id"]])
        )
    chosen = [data["images"][i] for i in sorted(data["images"]) if i in boxes]
    return [
        Sample(
            image_id=img["id"],
            file_name=img["file_name"],
            width=img["width"],
            height=img["height"],
            boxes=boxes[img["id"]],
        )
        for img in chosen[:n]
    ]


@router.get(
    "/{ref}/images/{image_id}",
    response_class=FileResponse,
    summary="One image of a dataset",
    responses={**_ERRORS, 200: {"content": {"image/*": {}}, "description": "The image file."}},
)
def image(
    ref: str,
    image_id: int,
    session: SessionDep,
    user: CurrentUser,
    split: Annotated[str, Query(pattern="^(train|val)$")] = "train",
) -> FileResponse:
    """The image file as stored, for drawing its boxes over it."""
    return image_response(_split(_get(session, user, ref), split), image_id, split)


def image_response(paths: dict[str, str], image_id: int, split: str) -> FileResponse:
    """Image `image_id` of a split (its `images` folder and `annotations` file), looked up in
    the annotations and kept inside the folder the way the loader keeps it."""
    from hmkd_core.data.coco import image_path

    with _as_checked():
        entry = annotations_of(paths["annotations"])["images"].get(image_id)
        if entry is None:
            raise NotFound(f"no image {image_id} in the {split} split")
        path = image_path(Path(paths["images"]), entry["file_name"], image_id)
        try:
            present = path.is_file()
        except OSError:  # a name longer than the file system takes
            present = False
    if not present:
        raise NotFound(f"image {image_id}'s file is missing")
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})
