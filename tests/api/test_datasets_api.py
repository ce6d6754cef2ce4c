"""`/v1/datasets`: chunked, resumable uploads checked on arrival, registration, stats, specs
that name a dataset, and what another team cannot see."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs.settings import Settings
from tests.api.conftest import bearer, job_spec, submit
from tests.conftest import png_bytes

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]


def _coco(n_images: int, *, missing: bool = False) -> dict[str, Any]:
    images = [
        {"id": i, "file_name": f"{i}.png", "width": 640, "height": 512}
        for i in range(1, n_images + 1)
    ]
    if missing:
        images.append({"id": 99, "file_name": "gone.png", "width": 640, "height": 512})
    annotations = [
        {"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 12, 20]}
        for i in range(1, n_images + 1)
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _files(prefix: str = "", *, missing: bool = False) -> dict[str, bytes]:
    files = {}
    for split, n in (("train", 3), ("val", 2)):
        files[f"{prefix}{split}/annotations.json"] = json.dumps(
            _coco(n, missing=missing and split == "train")
        ).encode()
        for i in range(1, n + 1):
            files[f"{prefix}{split}/images/{i}.png"] = png_bytes(640, 512, i)
    return files


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _upload(client: TestClient, name: str, archive: bytes, chunk: int = 1000) -> Any:
    started = client.post("/v1/datasets/uploads", json={"name": name, "size": len(archive)})
    assert started.status_code == 201, started.text
    upload = started.json()
    for offset in range(0, len(archive), chunk):
        r = client.put(
            f"/v1/datasets/uploads/{upload['id']}",
            params={"offset": offset},
            content=archive[offset : offset + chunk],
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
    return client.post(f"/v1/datasets/uploads/{upload['id']}/complete")


def test_an_upload_resumes_at_the_servers_offset_and_becomes_a_version(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    archive = _zip(_files("export/"))  # one folder wrapping the layout
    upload = client.post("/v1/datasets/uploads", json={"name": "drones", "size": len(archive)})
    upload_id = upload.json()["id"]
    url = f"/v1/datasets/uploads/{upload_id}"
    first = client.put(url, params={"offset": 0}, content=archive[:500])
    assert first.json()["offset"] == 500
    again = client.put(url, params={"offset": 0}, content=archive[:500])  # a retried chunk
    assert again.status_code == 409 and "offset=500" in again.json()["detail"]
    early = client.post(f"{url}/complete")
    assert early.status_code == 409 and "from offset 500" in early.json()["detail"]
    assert client.get(url).json()["offset"] == 500  # where an interrupted client resumes
    client.put(url, params={"offset": 500}, content=archive[500:])
    made = client.post(f"{url}/complete")
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["ref"] == "drones@1" and body["source"] == "upload"
    train = body["stats"]["train"]
    assert (train["images"], train["boxes"]) == (3, 3)
    assert [(c["name"], c["boxes"]) for c in train["categories"]] == [("person", 1), ("car", 2)]
    assert train["native_sizes"]["xsmall"] == 3  # 12 x 20 boxes: sqrt(240) ~ 15.5 px
    assert client.get(url).status_code == 404  # the upload became the dataset

    second = _upload(client, "drones", _zip(_files()))
    assert second.json()["ref"] == "drones@2"
    assert second.json()["sha256"] != body["sha256"]
    listed = client.get("/v1/datasets").json()
    assert [d["ref"] for d in listed] == ["drones@2", "drones@1"]
    at_input = client.get("/v1/datasets/drones@1", params={"min_size": 256, "max_size": 320})
    assert at_input.json()["stats"]["train"]["input_sizes"]["tiny"] == 3  # halved: 7.7 px

    # a spec names the dataset; the stored spec pins the version and the paths
    spec = job_spec(dataset, name="on-drones")
    del spec["data"]["train"], spec["data"]["val"]
    job = submit(client, {**spec, "dataset": "drones"})
    assert job["spec"]["dataset"] == "drones@2"
    assert job["spec"]["data"]["train"]["annotations"].endswith("train/annotations.json")
    pinned = submit(client, {**spec, "dataset": "drones@1"})
    assert "export/train" in pinned["spec"]["data"]["train"]["annotations"]
    short = submit(client, {**spec, "data": "dataset:drones@1"})  # the same, as a reference
    assert (
        short["spec"]["dataset"] == "drones@1" and short["spec"]["data"] == pinned["spec"]["data"]
    )
    both = client.post("/v1/jobs", json={**job_spec(dataset), "dataset": "drones"})
    assert both.status_code == 422 and both.json()["detail"][0]["field"] == "data.train"
    unknown = client.post("/v1/jobs", json={**spec, "dataset": "drones@7"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"] == "dataset"


def _tar_with_link() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        data = json.dumps(_coco(1)).encode()
        info = tarfile.TarInfo("annotations.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/1.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        t.addfile(link)
    return buffer.getvalue()


def _tar(entries: list[tuple[str, bytes | None, dict[str, str]]], mode: str = "w:gz") -> bytes:
    """A tar of (name, data or None for a folder, PAX headers) entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as t:
        for name, data, headers in entries:
            info = tarfile.TarInfo(name)
            info.pax_headers = headers
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tar_in(folder: str) -> bytes:
    """A good single-split export inside `folder`."""
    return _tar([(f"{folder}/{name}", data, {}) for name, data in _coco_with().items()])


def _coco_with(**changes: Any) -> dict[str, bytes]:
    coco = _coco(1)
    for key, value in changes.items():
        coco[key] = value
    return {"annotations.json": json.dumps(coco).encode(), "images/1.png": png_bytes(640, 512)}


@pytest.mark.parametrize(
    ("archive", "field", "words"),
    [
        (_zip({"../evil.json": b"{}"}), "archive", "leads outside the archive"),
        (_zip(_files())[:-40], "archive", "not a zip or tar archive"),
        (_tar([("a", b"x", {}), ("a/b", b"y", {})])[:-10], "archive", "cannot be unpacked"),
        (_tar([("a", None, {"comment": "x" * 200_000})]), "archive", "bytes of headers"),
        (
            _zip(_coco_with(categories=[{"id": 1, "name": "\udcff"}, {"id": 2, "name": "car"}])),
            "train",
            "unencodable",
        ),
        (
            _zip(
                _coco_with(
                    annotations=[
                        {
                            "id": 1,
                            "image_id": 1,
                            "category_id": 1,
                            "bbox": [1, 1, 2, 2],
                            "area": "big",
                        }
                    ]
                )
            ),
            "train",
            "'area' must be a finite number",
        ),
        (
            _zip(
                _coco_with(
                    annotations=[
                        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10**400, 2]}
                    ]
                )
            ),
            "train",
            "4 finite numbers",
        ),
        (_tar_with_link(), "archive", "is not a file or folder"),
        # folder names a job's paths would carry: a tar's bytes that are not UTF-8 (here 0xff)
        # decode to a lone surrogate, which once made the job's answer a 500 after it was
        # stored; a tab made the dataset one that no spec could name
        (_tar_in("export\udcff"), "archive", "control characters or bytes that are not UTF-8"),
        (_tar_in("export\t1"), "archive", "control characters or bytes that are not UTF-8"),
        (_zip({"readme.txt": b"hi"}), "archive", "found no train/annotations.json"),
        (_zip(_files(missing=True)), "train", "train/images/gone.png not found"),
        (
            _zip({**_files(), "val/images/2.png": b"not an image"}),
            "val",
            "val/images/2.png in the images folder cannot be decoded",
        ),
        (b"not an archive at all", "archive", "not a zip or tar archive"),
    ],
)
def test_an_archive_that_cannot_be_a_dataset_is_refused_naming_the_entry(
    client: TestClient, archive: bytes, field: str, words: str, service_settings: Settings
) -> None:
    r = _upload(client, "bad", archive)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == field and words in error["msg"], error
    assert str(service_settings.data_dir) not in error["msg"]  # no server paths
    assert client.get("/v1/datasets").json() == []
    store = service_settings.dataset_store
    assert (
        store is not None and [p.name for p in store.iterdir() if not p.name.startswith(".")] == []
    )
    assert not list((store / ".unpacking").glob("*"))  # a refused archive leaves nothing


def test_uploads_are_bounded(client: TestClient, service_settings: Settings) -> None:
    too_big = service_settings.max_dataset_bytes + 1
    r = client.post("/v1/datasets/uploads", json={"name": "big", "size": too_big})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "size"
    r = client.post("/v1/datasets/uploads", json={"name": "../x", "size": 10})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "name"
    upload = client.post("/v1/datasets/uploads", json={"name": "small", "size": 4}).json()
    r = client.put(f"/v1/datasets/uploads/{upload['id']}", params={"offset": 0}, content=b"12345")
    assert r.status_code == 422 and "declared size" in r.json()["detail"][0]["msg"]
    chunk = b"x" * (service_settings.upload_chunk_bytes + 1)
    r = client.put(f"/v1/datasets/uploads/{upload['id']}", params={"offset": 0}, content=chunk)
    assert r.status_code == 413


def test_another_team_sees_nothing_and_only_admins_register_folders(
    client: TestClient,
    dataset: dict[str, Path],
    other_team_user: tuple[Any, str],
    tmp_path: Path,
) -> None:
    assert _upload(client, "mine", _zip(_files())).status_code == 201
    theirs = bearer(other_team_user[1])
    assert client.get("/v1/datasets", headers=theirs).json() == []
    assert client.get("/v1/datasets/mine", headers=theirs).status_code == 404
    assert client.get("/v1/datasets/mine/samples", headers=theirs).status_code == 404
    spec = job_spec(dataset)
    del spec["data"]["train"], spec["data"]["val"]
    r = client.post("/v1/jobs", json={**spec, "dataset": "mine"}, headers=theirs)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "dataset"

    folder = {
        "images": str(dataset["train_images"]),
        "annotations": str(dataset["train_annotations"]),
    }
    r = client.post("/v1/datasets", json={"name": "folder", "train": folder}, headers=theirs)
    assert r.status_code == 403
    made = client.post("/v1/datasets", json={"name": "folder", "train": folder})
    assert made.status_code == 201 and made.json()["source"] == "path", made.text
    outside = {"images": str(tmp_path), "annotations": str(tmp_path / "a.json")}
    r = client.post("/v1/datasets", json={"name": "x", "train": outside})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "train.images"


def test_registering_a_folder_as_annotations_names_the_field(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    """The annotations were read for the dataset's hash before any check, a 500 for a folder."""
    folder = {"images": str(dataset["train_images"]), "annotations": str(dataset["train_images"])}
    r = client.post("/v1/datasets", json={"name": "folder", "train": folder})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "train.annotations"
    assert client.get("/v1/datasets").json() == []


def test_a_registered_folder_whose_annotations_changed_since_is_404_not_500(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    """A registered folder stays the server's: its files can change under a version."""
    folder = {
        "images": str(dataset["train_images"]),
        "annotations": str(dataset["train_annotations"]),
    }
    assert client.post("/v1/datasets", json={"name": "folder", "train": folder}).status_code == 201
    for change, words in (("{not json", "not valid JSON"), (None, "cannot read")):
        if change is None:
            dataset["train_annotations"].unlink()
        else:
            dataset["train_annotations"].write_text(change)
        for url in ("/folder/samples", "/folder?min_size=64", "/folder/images/1"):
            r = client.get(f"/v1/datasets{url}")
            assert r.status_code == 404 and words in r.json()["detail"], (url, r.text)


def test_samples_and_images_to_draw(client: TestClient) -> None:
    _upload(client, "drawn", _zip(_files()))
    samples = client.get("/v1/datasets/drawn/samples", params={"n": 2, "split": "val"}).json()
    assert [s["image_id"] for s in samples] == [1, 2]
    assert samples[0]["boxes"] == [{"bbox": [10.0, 10.0, 12.0, 20.0], "category": "car"}]
    r = client.get("/v1/datasets/drawn/images/2", params={"split": "val"})
    assert r.status_code == 200 and r.content == png_bytes(640, 512, 2)
    assert client.get("/v1/datasets/drawn/images/9").status_code == 404
    assert client.get("/v1/datasets/drawn@1/samples", params={"split": "test"}).status_code == 422
