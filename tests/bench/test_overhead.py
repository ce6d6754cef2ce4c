"""What `bench.overhead` counts: a distiller must not make the host wait for the device.

On a GPU a detector's training step is bound by the host, so a value read back to the host
inside a distiller (a branch on a tensor, `.item()`, a boolean index) stalls every step. The
count is the same on the CPU, so the rule is checked here, on every method.
"""

from __future__ import annotations

import pytest

from bench import overhead

ROWS = ("mimic", "fgd", "mgd", "hmkd", "hmkd: generative")


@pytest.mark.slow
def test_no_distiller_reads_a_device_value_back_to_the_host() -> None:
    spec = overhead.preset_spec("smoke")
    counts = overhead.count_ops(spec, batch_size=2, rows=ROWS)
    student = counts["student"]
    assert student["host_reads"] > 0  # the detector's own reads are seen (NMS, sampling)
    for row in ROWS:
        assert counts[row]["ops"] > student["ops"], row
        assert counts[row]["host_reads"] == student["host_reads"], row


@pytest.mark.slow
def test_class_scores_add_only_the_teachers_own_roi_pooling_reads() -> None:
    # the teacher's box head pools the student's RoIs as the student's does: torchvision's
    # multi-scale RoI Align finds each level's RoIs with one index read per pooled level, and
    # nothing else of the term reads the device
    spec = overhead.preset_spec("smoke")
    counts = overhead.count_ops(spec, batch_size=2, rows=("mimic", "class scores"))
    pooled_levels = 4  # Faster R-CNN's box_roi_pool reads P2..P5
    assert counts["class scores"]["host_reads"] == counts["mimic"]["host_reads"] + pooled_levels


def test_box_and_objectness_terms_never_wait_on_the_device() -> None:
    # the RoIs' classes and the teacher-nearer mask are masks, not indices: the two terms
    # read nothing back beyond what the class-score term's pooling already reads
    spec = overhead.preset_spec("smoke")
    rows = ("class scores", "class scores, boxes, objectness")
    counts = overhead.count_ops(spec, batch_size=2, rows=rows)
    assert counts[rows[1]]["host_reads"] == counts[rows[0]]["host_reads"]


def test_profile_writes_tables_for_the_student_and_every_row() -> None:
    spec = overhead.preset_spec("smoke")
    text = overhead.profile(spec, batch_size=1, rows=("mimic",), steps=1)
    assert "######## student" in text and "######## mimic" in text
