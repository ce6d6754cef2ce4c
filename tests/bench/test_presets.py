"""Presets' rows: what a preset may change of a row's declared options."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.presets import CPU_SCRATCH, PRESETS, ROWS, row_distill
from hmkd_core.spec import DistillSpec


def test_a_presets_row_override_replaces_only_what_it_names_on_that_preset() -> None:
    row = "hmkd: generative, uniform cells, pooled query, HM half the pull"
    declared = row_distill(CPU_SCRATCH, row)
    other = replace(CPU_SCRATCH, row_overrides={row: {"hmkd": {"w_hm": 7.0}}})
    overridden = row_distill(other, row)
    assert overridden["hmkd"]["w_hm"] == 7.0
    assert overridden["hmkd"]["hm"] == declared["hmkd"]["hm"]  # nested options kept
    assert overridden["weight"] == declared["weight"]
    assert row_distill(CPU_SCRATCH, row) == declared  # the declared row is left alone
    DistillSpec.model_validate(overridden)


def test_a_row_override_must_name_a_row() -> None:
    with pytest.raises(ValueError, match="name no row"):
        replace(CPU_SCRATCH, row_overrides={"hmkd: no such row": {"weight": 2.0}})


def test_every_presets_overrides_make_valid_specs() -> None:
    for preset in PRESETS.values():
        for row in preset.row_overrides:
            assert row in ROWS
            DistillSpec.model_validate(row_distill(preset, row))


def test_a_presets_level_weights_reach_its_methods_rows_and_multiply_a_rows_own() -> None:
    preset = replace(
        CPU_SCRATCH,
        weights={"hmkd": 2.0},
        level_weights={"hmkd": {"p2": 4.0, "p3": 0.5, "p4": 1.0}},
    )
    plain = row_distill(preset, "hmkd")
    assert plain["weight"] == 2.0
    assert plain["level_weights"] == {"p2": 4.0, "p3": 0.5, "p4": 1.0}
    DistillSpec.model_validate(plain)
    own = replace(preset, row_overrides={"hmkd": {"level_weights": {"p3": 3.0}}})
    assert row_distill(own, "hmkd")["level_weights"] == {"p2": 4.0, "p3": 1.5, "p4": 1.0}
    # another method's rows, and the student alone, are untouched
    assert "level_weights" not in row_distill(preset, "mimic")
    assert "level_weights" not in row_distill(preset, "none")
