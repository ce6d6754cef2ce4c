"""The committed run records are of the experiments today's code would run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.records import RESULTS, spec_hash

RECORDS = sorted(p for p in RESULTS.rglob("*.json") if "spec_hash" in json.loads(p.read_text()))
ROOTS = {"work": Path("/work-root"), "data": Path("/data-root")}


def test_there_are_records_to_check() -> None:
    assert len(RECORDS) >= 10


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_committed_record_matches_its_spec_under_todays_defaults(path: Path) -> None:
    # a new option or a changed default that changes this hash would leave the pages showing
    # records the table no longer reuses: add the option to LATER_OPTIONS, or rerun the rows
    record = json.loads(path.read_text())
    text = json.dumps(record["spec"])
    for role, root in ROOTS.items():
        text = text.replace(f"<{role}>", str(root))
    assert spec_hash(json.loads(text), ROOTS) == record["spec_hash"]


def test_an_unset_later_block_leaves_the_hash_as_before_it_existed() -> None:
    # `distill.response` is a block of later options only: at its defaults the whole block,
    # not just its leaves, must be left out, or every earlier record would change its hash
    record = next(r for r in map(json.loads, map(Path.read_text, RECORDS)) if _distils(r))
    text = json.dumps(record["spec"])
    for role, root in ROOTS.items():
        text = text.replace(f"<{role}>", str(root))
    spec = json.loads(text)
    spec.setdefault("distill", {})["response"] = {"weight": 0.0, "temperature": 1.0}
    assert spec_hash(spec, ROOTS) == record["spec_hash"]  # made before the block existed
    spec["distill"]["response"]["weight"] = 0.5
    assert spec_hash(spec, ROOTS) != record["spec_hash"]


def _distils(record: dict) -> bool:
    return record["spec"].get("distill", {}).get("method", "none") != "none"
