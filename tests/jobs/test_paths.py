"""Dataset and weight paths must lie under the configured roots, judged after resolving."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.paths import PathNotAllowed, confine


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "data_a", tmp_path / "data_b"
    (a / "digits" / "images").mkdir(parents=True)
    (b / "coco.json").parent.mkdir(parents=True)
    (b / "coco.json").write_text("{}")
    return [a, b]


def test_paths_under_any_root_are_resolved(roots: list[Path]) -> None:
    a, b = roots
    assert confine(a / "digits" / "images", roots, field="f") == (a / "digits/images").resolve()
    assert confine(str(b / "coco.json"), roots, field="f") == (b / "coco.json").resolve()
    assert confine(a / "digits" / ".." / "digits", roots, field="f") == (a / "digits").resolve()
    assert confine(a / "later.json", roots, field="f", must_exist=False) == a / "later.json"


def test_outside_every_root_names_the_field_and_roots(roots: list[Path], tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed) as err:
        confine("/x", roots, field="data.train.images")
    assert err.value.field == "data.train.images"
    assert str(err.value).startswith("data.train.images: /x is outside the dataset roots [")
    assert str(roots[0]) in str(err.value) and str(roots[1]) in str(err.value)


def test_dotdot_out_of_a_root_is_refused(roots: list[Path]) -> None:
    with pytest.raises(PathNotAllowed, match="outside the dataset roots"):
        confine(roots[0] / ".." / "data_b_not", roots, field="f", must_exist=False)
    with pytest.raises(PathNotAllowed, match="outside"):
        confine(f"{roots[0]}/../../../etc/passwd", roots, field="f")


def test_a_symlink_out_of_a_root_is_refused(roots: list[Path], tmp_path: Path) -> None:
    outside = tmp_path / "private"
    outside.mkdir()
    os.symlink(outside, roots[0] / "link")
    with pytest.raises(PathNotAllowed, match="resolves to"):
        confine(roots[0] / "link", roots, field="teacher.weights")


def test_a_prefix_of_a_root_name_is_not_inside_it(roots: list[Path], tmp_path: Path) -> None:
    sibling = tmp_path / "data_a_evil"
    sibling.mkdir()
    with pytest.raises(PathNotAllowed, match="outside"):
        confine(sibling, roots, field="f")


def test_missing_relative_and_nul(roots: list[Path]) -> None:
    with pytest.raises(PathNotAllowed, match="does not exist") as err:
        confine(roots[0] / "nope", roots, field="data.val.annotations")
    assert err.value.message.endswith("does not exist")
    with pytest.raises(PathNotAllowed, match="relative path"):
        confine("digits/images", roots, field="f")
    with pytest.raises(PathNotAllowed, match="NUL"):
        confine(f"{roots[0]}/a\x00b", roots, field="f")


def test_a_fifo_is_refused_before_anything_reads_it(roots: list[Path]) -> None:
    """Reading a named pipe blocks until someone writes to it: a spec naming one would stall
    the request that checks the data."""
    fifo = roots[0] / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(PathNotAllowed, match="not a regular file or folder") as err:
        confine(fifo, roots, field="data.train.annotations")
    assert err.value.field == "data.train.annotations"
    link = roots[0] / "link.json"  # a symlink to it is judged by what it resolves to
    link.symlink_to(fifo)
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        confine(link, roots, field="data.train.annotations")


def test_an_annotation_file_that_is_a_fifo_is_a_dataset_error(tmp_path: Path) -> None:
    from hmkd_core.data import DatasetError, read_annotation_file

    fifo = tmp_path / "a.json"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:  # a read that blocks fails the test, not hangs it
        reading = pool.submit(read_annotation_file, fifo)
        try:
            with pytest.raises(DatasetError, match="not a regular file"):
                reading.result(timeout=30)
        finally:
            if not reading.done():  # a writer that closes at once lets the blocked read end
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
