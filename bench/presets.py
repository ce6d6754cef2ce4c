"""The benchmark's presets: the data, the two detectors, the schedules, the rows and weights.

A preset is plain data so the results pages can print it, and a reviewer can see in one place
what a table was trained with. Specs are built as dicts and validated by `TrainSpec`, exactly
as a user's YAML would be; nothing here bypasses the library's own checks.

Two protocols:
- `warm` (the default): the teacher trains to its plateau; a student trains alone to its
  plateau (the *base*); then every row, `none` included, continues from the base for the same
  further schedule. Distillation is judged where it is used in practice: on a student that has
  already learnt what it can alone.
- `scratch`: every row trains the student from random weights for the same schedule.

Each preset carries its own distillation weights (`weights`), calibrated on that preset's
teacher and base student by gradient ratio (`python -m bench.calibrate`): a weight found on
one teacher's feature scale does not carry over to another's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from hmkd_core.spec import METHODS, HMKDOptions, TrainSpec

# HM's decoder with MGD's generator and 45 % mask, weighing every cell alike as MGD's sum does
_GENERATIVE_UNIFORM: dict[str, Any] = {
    "generator": True,
    "mask_ratio": 0.45,
    "cell_weights": "uniform",
}


def _hm_only_generative(weight: float, **hm: Any) -> dict[str, Any]:
    """A row of HM alone with MGD's generator and 45 % mask, every cell weighed alike, at
    `weight` x HMKD's calibrated weight; `hm` adds or overrides HM options."""
    return {
        "method": "hmkd",
        "weight": weight,
        "hmkd": {"sdm": {"enabled": False}, "hm": {**_GENERATIVE_UNIFORM, **hm}},
    }


def _w_hm(scale: float) -> float:
    """HMKD's `w_hm` raised `scale`-fold over its default."""
    return HMKDOptions.model_fields["w_hm"].default * scale


def _balanced(hm_scale: float, **hm: Any) -> dict[str, Any]:
    """Full HMKD (SDM on) with HM as in `_hm_only_generative`, at half HMKD's calibrated weight,
    so SDM pulls half as hard, and `w_hm` raised `hm_scale`-fold over its default, so HM pulls
    as hard as `_hm_only_generative(hm_scale / 2)` would."""
    return {
        "method": "hmkd",
        "weight": 0.5,
        "hmkd": {"w_hm": _w_hm(hm_scale), "hm": {**_GENERATIVE_UNIFORM, **hm}},
    }


def _class_scores(
    weight: float = 1.0,
    temperature: float = 2.0,
    *,
    method: str = "mimic",
    method_weight: float = 0.0,
    **terms: float,
) -> dict[str, Any]:
    """A row with the class-score term (`distill.response`) at `weight` and `temperature`
    beside `method` at `method_weight` x its calibrated weight; `terms` sets the other response
    terms' weights. The default carrier is mimic at weight 0: it only brings the teacher the
    terms need (the cheapest method to compute)."""
    return {
        "method": method,
        "weight": method_weight,
        "response": {"weight": weight, "temperature": temperature, **terms},
    }


# FGD's official Faster R-CNN configuration distils P2..P5 (HMKD's levels are P2..P4).
FGD_LEVELS = ["p2", "p3", "p4", "p5"]

# HMKD's matching at a quarter of its default width (`hmkd.hm`): one 16-channel head, as wide
# as each of the default's four, with the query from the teacher's deep levels only.
LIGHT_HM = {"dim": 16, "heads": 1, "query_levels": "deep"}

# Rows of the table: the method, then the options that make the row. Every row of a preset
# gets that preset's calibrated `weight` for its method on top.
ROWS: dict[str, dict[str, Any]] = {
    **{method: {"method": method} for method in METHODS},  # one row per method, as declared
    "fgd": {"method": "fgd", "levels": FGD_LEVELS},
    "hmkd: norm attention": {"method": "hmkd", "hmkd": {"sdm": {"normalize": True}}},
    "hmkd: deep query": {"method": "hmkd", "hmkd": {"hm": {"query_levels": "deep"}}},
    "hmkd: warm-up": {"method": "hmkd", "warmup_iters": 100},
    "hmkd: HM only": {"method": "hmkd", "hmkd": {"sdm": {"enabled": False}}},
    "hmkd: SDM only": {"method": "hmkd", "hmkd": {"hm": {"enabled": False}}},
    "hmkd: student query": {"method": "hmkd", "hmkd": {"hm": {"query_source": "student"}}},
    # HM alone at the calibrated weight gets 1/7 of the gradient budget full HMKD is
    # calibrated to (SDM took the rest; `bench.diagnose` on HIT-UAV): here it gets all of it
    "hmkd: HM only, full weight": {
        "method": "hmkd",
        "weight": 7.0,
        "hmkd": {"sdm": {"enabled": False}},
    },
    # only the finest level, where the small objects are: on HIT-UAV the distillation gradient
    # on P3/P4 was 1.2-3.9x the detector's own (`bench.diagnose`), and every row lost AP_S
    "hmkd: P2 only": {"method": "hmkd", "levels": ["p2"]},
    # the first quarter of the 200 iterations fits the distiller to the warm student's
    # features before its gradient reaches them: a random adapter pulls a trained student's
    # features toward re-encoding what it already has (the student's head reads the old code)
    "hmkd: aligned": {"method": "hmkd", "align_iters": 50},
    "mgd: aligned": {"method": "mgd", "align_iters": 50},
    # MGD's generator gradients fire the joint clip on every step at its calibrated weight
    # (`bench.diagnose` on HIT-UAV), shrinking the student's detection step with them
    "mgd: clip apart": {"method": "mgd", "clip_apart": True},
    # HM without SDM (the SDM-off ablation was the least harmful on HIT-UAV), deep query
    "hmkd: HM only, deep query": {
        "method": "hmkd",
        "hmkd": {"sdm": {"enabled": False}, "hm": {"query_levels": "deep"}},
    },
    # the method at a quarter of its calibrated weight: whether its loss against `none` shrinks
    # with the pull (from a random teacher, the pull alone cost more than a point)
    "hmkd: quarter weight": {"method": "hmkd", "weight": 0.25},
    # ... and at a sixteenth: on the fourth HIT-UAV pair a quarter of the pull still cost about
    # half of the full pull's loss. A loss that stays near the quarter's here would be a cost
    # that does not scale with the pull at all, something a distilling row does besides pulling
    "hmkd: sixteenth weight": {"method": "hmkd", "weight": 0.0625},
    # Class scores instead of features: every feature pull tried cost the warm student AP_S,
    # less as the pull shrank. Here the teacher's box head scores the RoIs the student's
    # trained on (`distill.response`, soft targets at T 2, Hinton's weight of 1 beside the
    # detector's cross-entropy). Then the same term beside HMKD at a sixteenth of its weight,
    # the pull that cost nothing measurable.
    "class scores": _class_scores(),
    "hmkd: sixteenth weight, class scores": _class_scores(method="hmkd", method_weight=0.0625),
    # the class-score term's own two settings, each moved one step: twice the pull, and a
    # softer target (T 4) that gives the teacher's ranking of the wrong classes more weight
    "class scores: double weight": _class_scores(weight=2.0),
    "class scores: T 4": _class_scores(temperature=4.0),
    # The box head's other output and the RPN's: the teacher's box deltas on the foreground
    # RoIs where they are nearer the ground truth than the student's, and its objectness at
    # every anchor, each at the weight of the detector's own loss for the same output. Paired
    # with `class scores`, each row measures what its added term brings.
    "class scores, boxes": _class_scores(box_weight=1.0),
    "class scores, boxes, objectness": _class_scores(box_weight=1.0, objectness_weight=1.0),
    # ... and the same terms beside HMKD at a sixteenth of its weight, as the class scores were
    "hmkd: sixteenth weight, class scores, boxes": _class_scores(
        method="hmkd", method_weight=0.0625, box_weight=1.0
    ),
    "hmkd: sixteenth weight, class scores, boxes, objectness": _class_scores(
        method="hmkd", method_weight=0.0625, box_weight=1.0, objectness_weight=1.0
    ),
    # HMKD's counterpart with the strongest feature baseline on HIT-UAV in its place: the same
    # response terms, FGD at the same sixteenth of its own calibrated weight. Paired with the
    # HMKD row, what HMKD's matching is worth over FGD's masks, every other pull held equal
    "fgd: sixteenth weight, class scores, boxes": {
        **_class_scores(method="fgd", method_weight=0.0625, box_weight=1.0),
        "levels": FGD_LEVELS,
    },
    # HM at a quarter of its width, so its step fits: on an Intel CPU full HMKD cost 1.12 to
    # 1.17x the floor (1.07 on AMD), its window attention and 64-wide convs at P2 most of it. One
    # head of the default per-head width (16 channels), and the query read from the teacher's
    # deep levels (P5, P6) only, as the paper describes it. Alone, then beside the terms.
    "hmkd: light": {"method": "hmkd", "hmkd": {"hm": LIGHT_HM}},
    "hmkd: light, sixteenth weight, class scores, boxes": {
        **_class_scores(method="hmkd", method_weight=0.0625, box_weight=1.0),
        "hmkd": {"hm": LIGHT_HM},
    },
    # objectness at a quarter of the detector's own weight: at 1 its pull was twice the box
    # term's and fired the gradient clip on 38 % of batches (`bench.diagnose`, fourth HIT-UAV
    # pair), and the row lost what the box term had gained
    "class scores, boxes, quarter objectness": _class_scores(
        box_weight=1.0, objectness_weight=0.25
    ),
    # Negative controls: the teacher's architecture with random weights (one draw per seed,
    # `bench.controls`), which knows nothing of the data. Paired with the row of the trained
    # teacher, the difference is what the teacher's knowledge is worth to the method; paired
    # with `none`, what pulling the student toward some fixed function of the image costs.
    # The pull must match: at the method's weight a random teacher's distillation gradient on
    # the student's features was 37.9x the detector's, against 0.85x from the trained teacher
    # (`bench.diagnose` on the sixth HIT-UAV pair), so HMKD's control gets 0.85 / 37.9 of it.
    "hmkd: random teacher": {"method": "hmkd", "teacher": "random", "weight": 0.0224},
    # mimic weighs every cell alike, so its pull hardly depends on the teacher: at mimic's
    # weight the ratio was 0.512 from the random teacher against 0.569 from the trained one
    # (per level 0.094 / 3.0 / 4.6 against 0.091 / 3.7 / 5.0), hence 0.569 / 0.512 of it
    "mimic: random teacher": {"method": "mimic", "teacher": "random", "weight": 1.11},
    # the same control matched where the from-scratch rows start (`cpu-scratch`: a random
    # student, SmallDigits): at 1.11 x mimic's weight the random teacher's ratio was 0.317
    # against the trained teacher's 0.500 at mimic's own (`bench.diagnose`), hence 1.11 x 0.500
    # / 0.317. Overall, not level by level: per level 0.091 / 9.7 / 39.5 at 1.11 x against
    # 0.098 / 8.9 / 73.3, as the random teacher's deep features are weaker
    "mimic: random teacher, from-scratch match": {
        "method": "mimic",
        "teacher": "random",
        "weight": 1.75,
    },
    # HM's decoder with MGD's generator and mask (`cpu-scratch-generative`): the student's
    # values need only hold what a small conv net can rebuild the teacher's feature from
    "hmkd: generative": {
        "method": "hmkd",
        "hmkd": {"hm": {"generator": True, "mask_ratio": 0.45}},
    },
    # ... and weighing every cell alike, as MGD's plain sum does (HM's masks give each box and
    # the whole background a total of one, so most cells hardly count)
    "hmkd: generative, uniform cells": {"method": "hmkd", "hmkd": {"hm": {**_GENERATIVE_UNIFORM}}},
    # HM alone, generative and weighing every cell alike: MGD's loss read through HM's decoder.
    # In full HMKD at its calibrated weight HM pulls 0.0115 x the detector's gradient, SDM's
    # foreground term 0.501 (`bench.diagnose` on `cpu-scratch`), so no HM variant there had
    # much grip on the student; alone at HMKD's weight this one pulls 0.045, and 11.1x makes
    # MGD's 0.500 (per level 0.43 / 12.8 / 17.7 against MGD's 0.41 / 12.8 / 27.8)
    "hmkd: HM only, generative, uniform cells": _hm_only_generative(11.1),
    # ... with a window of one cell, where the attention returns each cell's own value: MGD's
    # loss behind HM's extra 1x1 maps, the teacher's query left without a say (0.043 at
    # HMKD's weight, hence 11.6x for MGD's pull)
    "hmkd: HM only, generative, uniform cells, window 1": _hm_only_generative(11.6, window=1),
    # ... with a 5 x 5 window: if mixing under the teacher's query is what costs, a wider
    # mixture should cost more (at 11.1x it pulls 0.504, as the 3 x 3 row does)
    "hmkd: HM only, generative, uniform cells, window 5": _hm_only_generative(11.1, window=5),
    # ... with the 3 x 3 window but the query built from the aligned student instead of the
    # teacher: whether what costs the gain is the mixing or the teacher's say in it (the query
    # path pulls on the student too: 0.621 at 11.1x, hence 8.94x for MGD's 0.500)
    "hmkd: HM only, generative, uniform cells, student query": _hm_only_generative(
        8.94, query_source="student"
    ),
    # ... with the teacher's query averaged over each image before decoding: the teacher still
    # says what the image holds but no longer picks a mixture per cell. If the teacher's say
    # per cell is what costs, this row should land near the one-cell window
    "hmkd: HM only, generative, uniform cells, pooled query": _hm_only_generative(
        10.26, query_pool="image"
    ),
    # ... with the pooled query and each student value sent only its own cell's gradient (the
    # forward still mixes the 3 x 3 window): whether the mixture costs by letting the decoder
    # rebuild a cell from its neighbours, or by spreading a cell's error over their values
    # (it pulls 0.153 at 10.26x: the values now get the centre slot's share only; 33.5x makes
    # MGD's 0.500, per level 0.40 / 13.4 / 28.9 against the pooled row's 0.40 / 12.6 / 31.2)
    "hmkd: HM only, generative, uniform cells, pooled query, own-cell gradient": (
        _hm_only_generative(33.5, query_pool="image", value_grad="own")
    ),
    # ... and with the 5 x 5 window: with no per-cell say, a wider mixture should cost little
    # (0.551 at 11.1x, hence 10.07x)
    "hmkd: HM only, generative, uniform cells, pooled query, window 5": _hm_only_generative(
        10.07, query_pool="image", window=5
    ),
    # Full HMKD, SDM on, with HM given half the pull: at HMKD's calibrated weight SDM pulls
    # 0.501 x the detector's gradient and HM 0.0115 (`bench.diagnose` on `cpu-scratch`), so the
    # method as calibrated is almost all SDM. Half the weight halves SDM's pull; HM's own weight
    # is raised so that it pulls the other half of MGD's 0.500 (multipliers set by
    # `bench.diagnose` on this preset). With the teacher's query as a map, and pooled per image
    "hmkd: generative, uniform cells, HM half the pull": _balanced(11.1),
    "hmkd: generative, uniform cells, pooled query, HM half the pull": _balanced(
        10.26, query_pool="image"
    ),
    # ... and the pooled row's HM alone at the same half (SDM off): the pooled row minus this
    # one is what SDM adds beside HM (at 5.13x it pulls half of MGD's 0.500, `bench.diagnose`)
    "hmkd: HM only, generative, uniform cells, pooled query, half the pull": _hm_only_generative(
        5.13, query_pool="image"
    ),
    # The pooled row made light enough for the step goal: HM's generator 1x1 instead of
    # MGD's 3x3 (the decoder's attention already mixes each 3x3 neighbourhood), and with the
    # attention's width halved too. On HIT-UAV's sizes the 3x3 pair is the largest part of
    # the pooled row's distiller, whose step was 1.160 x the floor (`w_hm`
    # 10.82x and 8.14x make HM pull 0.25, `bench.diagnose` on `cpu-scratch`)
    "hmkd: generative 1x1, uniform cells, pooled query, HM half the pull": _balanced(
        10.82, query_pool="image", generator_kernel=1
    ),
    "hmkd: generative 1x1, dim 32, uniform cells, pooled query, HM half the pull": _balanced(
        8.14, query_pool="image", generator_kernel=1, dim=32
    ),
    # the same pair at a quarter of the pull: mimic's pull alone cost 3.5 AP_S, which may hide
    # what its teacher knows (the ratios scale with the weight, so the match holds)
    "mimic: quarter weight": {"method": "mimic", "weight": 0.25},
    "mimic: random teacher, quarter weight": {
        "method": "mimic",
        "teacher": "random",
        "weight": 0.25 * 1.11,
    },
}

# What a row may say beside its `DistillSpec` options: which teacher it reads.
Teacher = Literal["trained", "random"]
TEACHERS: tuple[Teacher, ...] = get_args(Teacher)


def row_teacher(row: str) -> Teacher:
    """The teacher a row reads: `trained` (the preset's teacher stage) or `random`."""
    return ROWS[row].get("teacher", "trained")


def is_control(row: str) -> bool:
    """Whether a row distils from a random teacher (a negative control)."""
    return row_teacher(row) == "random"


def reads_trained_teacher(row: str) -> bool:
    """Whether a row needs the preset's trained teacher: tables and diagnostics of rows that
    don't (`none`, the controls) start without waiting for one to train."""
    return ROWS[row]["method"] != "none" and not is_control(row)


def measured_as(row: str) -> str:
    """The row whose training step a row's step is: the first declared row, not a control,
    that computes the same step. A control's is its method's row (the same options, the same
    teacher architecture; only the teacher's weights differ), and a variant that changes only
    the weight (`hmkd: quarter weight`) is its method's too: the weight scales a loss, it does
    not change what a step computes, so timing it apart would only add the measure's noise."""

    def step(r: str) -> dict[str, Any]:  # what a step computes: the options but the weight
        return {k: v for k, v in row_options(r).items() if k != "weight"}

    return next(r for r in ROWS if not is_control(r) and step(r) == step(row))


def row_options(row: str) -> dict[str, Any]:
    """A row's `DistillSpec` dict, as declared (no calibrated weight, no teacher choice)."""
    return {k: copy.deepcopy(v) for k, v in ROWS[row].items() if k != "teacher"}


@dataclass(frozen=True)
class Preset:
    """One benchmark configuration. Sizes are chosen to fit the machine it names."""

    name: str
    machine: str
    data: dict[str, Any]  # kind "digits" (make_small_digits arguments) or "coco" (a root)
    teacher: dict[str, Any]
    student: dict[str, Any]
    input_size: tuple[int, int]  # (min_size, max_size) of both detectors
    teacher_schedule: dict[str, Any]
    student_schedule: dict[str, Any]  # every row's schedule (the continuation, when warm)
    eval_every: int  # the rows' evaluations (0: at the end only)
    stage_eval_every: int  # the teacher's and the base's, for their curves and plateau check
    protocol: Literal["warm", "scratch"] = "warm"
    base_schedule: dict[str, Any] | None = None  # the student alone, to its plateau (warm)
    # While the teacher or the base still gains (AP_S over the last third of its run >=
    # PLATEAU_GAIN), it continues from where it stopped for another chunk of this schedule
    # (at its own batch size), at most `max_extensions` times; the rows use the last ones.
    extension_schedule: dict[str, Any] | None = None
    max_extensions: int = 0
    teacher_extensions: int | None = None  # the teacher's own cap (None: `max_extensions`)
    # A teacher that reads the images at a whole multiple of `input_size` (where the student
    # must downscale them, a teacher at full resolution still sees the small objects): after
    # its own chunks it trains one more at this size, on this schedule, and the rows distil
    # from it there (`hmkd_core.spec.teacher_input_scale`).
    teacher_input_size: tuple[int, int] | None = None
    teacher_resize_schedule: dict[str, Any] | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    jobs: int = 1  # runs at once
    threads: int = 1  # torch threads per run
    device: str = "auto"
    rows: tuple[str, ...] = field(default=tuple(ROWS))
    # DistillSpec.weight per method, from `python -m bench.calibrate --preset NAME`, and,
    # where it was run with `--per-level`, DistillSpec.level_weights per method.
    weights: dict[str, float] = field(default_factory=dict)
    level_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per row, options that replace the row's declared ones on this preset only: a row set to
    # a given pull (e.g. HM half of it) needs its own multiplier on each teacher's features,
    # measured there with `bench.diagnose`.
    row_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    anchors: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.row_overrides) - set(ROWS))
        if unknown:  # a misspelt row would leave its row as declared, silently
            raise ValueError(f"preset {self.name}: row_overrides name no row: {unknown}")
        if (self.teacher_input_size is None) != (self.teacher_resize_schedule is None):
            raise ValueError(
                f"preset {self.name}: teacher_input_size and teacher_resize_schedule go together"
            )

    def extensions(self, stage: str) -> int:
        """How many more chunks `stage` (teacher or base) may train while still gaining."""
        if stage == "teacher" and self.teacher_extensions is not None:
            return self.teacher_extensions
        return self.max_extensions

    def chunks(self, stage: str) -> int:
        """How many chunks `stage` may train after its first: its extensions, and for a
        teacher read at another input size, the chunk that trains it there."""
        resized = stage == "teacher" and self.teacher_input_size is not None
        return self.extensions(stage) + int(resized)

    @property
    def source(self) -> str:
        return "SmallDigits" if self.data["kind"] == "digits" else self.data["title"]


_DIGITS_128 = {
    "kind": "digits",
    "train": 1000,
    "val": 500,
    "tune": 200,  # the tuning split: drawn with another data seed, never reported
    "size": 128,
    "seed": 0,
    "max_digits": 6,
    "max_side": 24,
}
_CPU_TEACHER = {"backbone": "resnet34", "fpn_channels": 64}
_CPU_STUDENT = {"backbone": "resnet18", "fpn_channels": 32}
_CPU_TEACHER_SCHEDULE = {"iterations": 1500, "batch_size": 4, "lr": 4e-4, "warmup_iters": 50}
_CPU_BASE_SCHEDULE = {"iterations": 2400, "batch_size": 2, "lr": 4e-4, "warmup_iters": 50}


def _calibration(name: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parent / "results" / name / "weights.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def calibrated(name: str) -> dict[str, float]:
    """The weights `python -m bench.calibrate --preset NAME --write` stored for a preset
    (`bench/results/NAME/weights.json`, committed), or none: the library's defaults."""
    return _calibration(name).get("weights", {})


def calibrated_levels(name: str) -> dict[str, dict[str, float]]:
    """The per-level weights `bench.calibrate --per-level --write` stored for a preset, by
    method, or none."""
    return _calibration(name).get("level_weights", {})


_CPU_WEIGHTS = calibrated("cpu")

CPU = Preset(
    name="cpu",
    machine="2-core CPU",
    data=_DIGITS_128,
    teacher=_CPU_TEACHER,
    student=_CPU_STUDENT,
    input_size=(128, 128),
    teacher_schedule=_CPU_TEACHER_SCHEDULE,
    base_schedule=_CPU_BASE_SCHEDULE,
    extension_schedule={"iterations": 1200, "batch_size": 2, "lr": 2e-4, "warmup_iters": 20},
    max_extensions=1,
    student_schedule={"iterations": 300, "batch_size": 2, "lr": 1e-4, "warmup_iters": 20},
    eval_every=0,
    stage_eval_every=300,
    # in the order they are worth running: an interrupted table has the essential rows
    rows=("none", "hmkd", "mimic", "fgd", "mgd", "hmkd: norm attention", "hmkd: deep query"),
    jobs=2,
    threads=1,
    device="cpu",
    weights=_CPU_WEIGHTS,
)

# The earlier protocol, kept as a second table: every row from random weights. Here the
# teacher is far ahead of the students (about 47 AP_S against single digits), the regime where
# a teacher has the most to give. Its weights are calibrated at the rows' own starting point,
# the randomly initialised student (the warm base's gradients are another scale).
CPU_SCRATCH = replace(
    CPU,
    name="cpu-scratch",
    protocol="scratch",
    base_schedule=None,
    extension_schedule=None,
    max_extensions=0,
    student_schedule={"iterations": 600, "batch_size": 2, "lr": 4e-4, "warmup_iters": 50},
    eval_every=200,
    rows=(
        "none",
        "hmkd",
        "mimic",
        "fgd",
        "mgd",
        "mimic: random teacher, from-scratch match",
        "hmkd: HM only, generative, uniform cells",
        "hmkd: HM only, generative, uniform cells, window 1",
        "hmkd: HM only, generative, uniform cells, student query",
        "hmkd: HM only, generative, uniform cells, window 5",
        "hmkd: HM only, generative, uniform cells, pooled query",
        "hmkd: HM only, generative, uniform cells, pooled query, window 5",
        "hmkd: HM only, generative, uniform cells, pooled query, own-cell gradient",
        "hmkd: generative, uniform cells, pooled query, HM half the pull",
        "hmkd: generative, uniform cells, HM half the pull",
        "hmkd: HM only, generative, uniform cells, pooled query, half the pull",
        "hmkd: generative 1x1, uniform cells, pooled query, HM half the pull",
        "hmkd: generative 1x1, dim 32, uniform cells, pooled query, HM half the pull",
    ),
    weights=calibrated("cpu-scratch"),
)

# The from-scratch table's question, on a second teacher of the same recipe: MGD gained 13 AP_S
# there and HMKD nothing, although both put most of their pull on P2. What MGD asks of the
# student differs: to hold, in a masked feature, what a small conv generator needs to rebuild
# the teacher's. HMKD's prediction is a linear mixture of the student's values. The rows here
# give HMKD's decoder MGD's generator and masking, to see whether that carries the gain. At
# HMKD's calibrated weight both variants already pull as hard as `hmkd` on this teacher
# (gradient ratio 0.317 and 0.322 against 0.319, `bench.diagnose`), so they take no multiplier.
CPU_SCRATCH_GENERATIVE = replace(
    CPU_SCRATCH,
    name="cpu-scratch-generative",
    rows=("none", "hmkd", "mgd", "hmkd: generative", "hmkd: generative, uniform cells"),
)

GPU = Preset(
    name="gpu",
    machine="1 GPU",
    data={
        "kind": "digits",
        "train": 4000,
        "val": 500,
        "tune": 300,
        "size": 512,
        "seed": 0,
        "max_digits": 16,
    },
    teacher={"backbone": "resnet50", "fpn_channels": 256},
    student={"backbone": "resnet18", "fpn_channels": 128},
    input_size=(512, 512),
    teacher_schedule={"iterations": 6000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    base_schedule={"iterations": 4000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    student_schedule={"iterations": 1500, "batch_size": 8, "lr": 5e-5, "warmup_iters": 100},
    eval_every=0,
    stage_eval_every=1000,
    jobs=1,
    threads=8,
    device="cuda",
    weights=calibrated("gpu"),
)

# HIT-UAV: real thermal drone frames (640x512). Read from the shared data folder, never
# copied into the project. The tuning split is held out of the official train split.
_HITUAV = {
    "kind": "coco",
    "title": "HIT-UAV",
    "cite": 'Suo et al., "HIT-UAV: A high-altitude infrared thermal dataset for Unmanned '
    'Aerial Vehicle-based object detection", Scientific Data 10, 227 (2023), '
    "doi:10.1038/s41597-023-02066-6; CC BY 4.0",
    "root": "../shared/datasets/hituav",
    "tune": 200,  # train images held out (every 10th by id) for choosing defaults
}


def _hituav_half(weight: float, hm_scale: float) -> dict[str, Any]:
    """A `_balanced` row's weight and `w_hm` multiplier on `hituav-cpu`."""
    return {"weight": weight, "hmkd": {"w_hm": _w_hm(hm_scale)}}


HITUAV_CPU = Preset(
    name="hituav-cpu",
    machine="2-core CPU",
    data=_HITUAV,
    teacher=_CPU_TEACHER,
    student=_CPU_STUDENT,
    input_size=(256, 320),  # half of native: every object half as wide
    teacher_schedule={"iterations": 1000, "batch_size": 4, "lr": 4e-4, "warmup_iters": 50},
    base_schedule={"iterations": 1200, "batch_size": 2, "lr": 4e-4, "warmup_iters": 50},
    extension_schedule={"iterations": 800, "batch_size": 2, "lr": 2e-4, "warmup_iters": 20},
    max_extensions=0,  # raise where there is time: on 2 cores the base is not at its plateau
    student_schedule={"iterations": 200, "batch_size": 2, "lr": 1e-4, "warmup_iters": 20},
    eval_every=0,
    stage_eval_every=400,
    rows=(  # in the order they are worth running
        "none",
        "hmkd",
        "fgd",
        "mgd",
        "mimic",
        "hmkd: generative, uniform cells, pooled query, HM half the pull",
    ),
    jobs=2,
    threads=1,
    device="cpu",
    weights=calibrated("hituav-cpu"),
    # The rows that give HM and SDM's foreground term half the calibrated pull each (0.25 of
    # the detector's gradient), set by `bench.diagnose` on this preset's teacher and base: at
    # the pooled row's `cpu-scratch` multiplier (10.26x) HM pulled 5.4 to 8.3 here and SDM's
    # foreground term 0.33 to 0.35, so the whole weight is lower and `w_hm` far lower
    row_overrides={
        "hmkd: generative, uniform cells, pooled query, HM half the pull": _hituav_half(
            0.375, 0.629
        ),
        "hmkd: generative 1x1, uniform cells, pooled query, HM half the pull": _hituav_half(
            0.364, 0.522
        ),
        "hmkd: generative 1x1, dim 32, uniform cells, pooled query, HM half the pull": (
            _hituav_half(0.361, 0.426)
        ),
    },
)

# The same stages as `hituav-cpu` (identical specs, so a table reuses trained ones), but every
# row continues three times as long. At 200 iterations every distilling row loses AP_S and
# the harm grows with how hard the features are pulled: is that a transient the student
# recovers from, or a lasting cost, once it has time to use what it is pulled toward? The
# rows are evaluated every 200 iterations to show that (a run still keeps its last weights).
# The response terms, the one pull whose mean gained at 200 iterations on each pair that ran
# them, ask the same question the other way round: does a gain grow once the student has time
# to use it? HMKD with the light HM at a sixteenth beside them asks whether the features add
# to it there.
HITUAV_CPU_LONG = replace(
    HITUAV_CPU,
    name="hituav-cpu-long",
    student_schedule={"iterations": 600, "batch_size": 2, "lr": 1e-4, "warmup_iters": 20},
    eval_every=200,
    rows=(
        "none",
        "hmkd",
        "class scores, boxes",
        "hmkd: light, sixteenth weight, class scores, boxes",
        "hmkd: P2 only",
    ),
)

# The `hituav-cpu` stages, then the teacher trains one more chunk at HIT-UAV's native size
# (640x512, twice the student's input), and the rows distil from it there. On every CPU pair
# a teacher at the student's input led the student alone by only 1.7 to 5.6 AP_S: too little
# to give +3. Halving the frames is what costs the small objects (a 12-px person becomes 6
# px), so a teacher reading them at full size sees what the student's input no longer shows,
# and the student is taught it on its own grid. The chunk (800 images at four times the
# pixels) took 28.5 min here, against 47.5 for the first teacher stage beside the base. The
# distillation weights stay the ones calibrated on the first teacher: the response terms, the
# pull of both rows here, are not scaled by the feature calibration.
HITUAV_CPU_NATIVE_TEACHER = replace(
    HITUAV_CPU,
    name="hituav-cpu-native-teacher",
    teacher_input_size=(512, 640),
    teacher_resize_schedule={"iterations": 400, "batch_size": 2, "lr": 2e-4, "warmup_iters": 20},
    rows=("none", "class scores, boxes", "hmkd: light, sixteenth weight, class scores, boxes"),
)

# The same stages and teacher at native size, each feature method at the weight calibrated on
# this teacher (`bench/results/hituav-cpu-native-teacher-calibrated/weights.json`). Pooled onto
# the student's grid, the native teacher's levels are smoother than the first teacher's, and
# at the first teacher's weight HMKD pulled a quarter of the detector's gradient instead of
# half; here every method pulls what the calibration target asks, as on every other pair.
# The `none` runs are the table above's.
HITUAV_CPU_NATIVE_TEACHER_CALIBRATED = replace(
    HITUAV_CPU_NATIVE_TEACHER,
    name="hituav-cpu-native-teacher-calibrated",
    weights=calibrated("hituav-cpu-native-teacher-calibrated"),
    rows=("none", "hmkd", "fgd", "mgd", "mimic"),
)

# The `hituav-cpu` stages, each feature method calibrated level by level
# (`python -m bench.calibrate --per-level`). The detector's own gradient is 10 to 13 times
# larger at P2 than at P3 or P4, so one weight per method, set on the ratio over all levels,
# left HMKD pulling P4 three times as hard as the detector does there, P3 as hard, and P2, the
# small objects' level, at half. Here each level pulls half its own detection gradient.
HITUAV_CPU_LEVEL_CALIBRATED = replace(
    HITUAV_CPU,
    name="hituav-cpu-level-calibrated",
    weights=calibrated("hituav-cpu-level-calibrated"),
    level_weights=calibrated_levels("hituav-cpu-level-calibrated"),
    rows=("none", "hmkd", "mimic", "fgd", "mgd"),
)

# The `hituav-cpu` stages, each feature method comparing standardized maps
# (`distill.standardize`: each image's channel at zero mean and unit variance, the student's
# after its adapter; Pearson-correlation distillation). On every pair a feature pull cost the
# warm student AP_S, more the harder it pulled, and a random teacher's pull cost at least as
# much as the trained teacher's: the cost is in moving the student's features at all, and the
# detector head, fitted to the student's own channel scales, pays for a pull toward the
# teacher's. Standardized, the pull asks only for the teacher's pattern of activity. The
# weights are calibrated on the standardized methods (the rows named after a method are
# standardized here); the `none` runs are the controls table's.
HITUAV_CPU_STANDARDIZED = replace(
    HITUAV_CPU,
    name="hituav-cpu-standardized",
    weights=calibrated("hituav-cpu-standardized"),
    rows=("none", "hmkd", "mimic"),
    row_overrides={m: {"standardize": True} for m in ("hmkd", "mimic", "fgd", "mgd")},
)

# The same first stages as `hituav-cpu`, then a stage still gaining continues for one more
# chunk (800 iterations at its own batch size). On every `hituav-cpu` pair the teacher was
# only about 4 AP_S above the base, and the student alone reached within 2 AP_S of it in 600
# more iterations, which suggested a teacher with little to teach. Here the teacher sees 7200
# images against the base's 4000 (it ended 5.6 AP_S above `none`, and HMKD lost the same).
HITUAV_CPU_EXTENDED = replace(
    HITUAV_CPU,
    name="hituav-cpu-extended",
    max_extensions=1,
    rows=("none", "hmkd", "mimic", "fgd", "mgd", "hmkd: P2 only"),
)

# The same extended base, distilled from the first teacher (`hituav-cpu`'s, not extended): with
# `hituav-cpu-extended` it isolates the teacher's strength, every other input held fixed (the
# `none` rows are the same runs in both).
HITUAV_CPU_EXTENDED_BASE = replace(
    HITUAV_CPU_EXTENDED,
    name="hituav-cpu-extended-base",
    teacher_extensions=0,
    rows=("none", "hmkd", "mimic"),
)

# The `hituav-cpu` stages with a negative control: `hmkd` beside HMKD distilled from a random
# teacher. On the fifth pair a teacher 5 AP_S stronger was worth +0.86 AP_S to mimic and
# nothing measurable to HMKD; here the teacher's whole knowledge is taken away, and `hmkd`
# minus its control is what that knowledge is worth to it. The same pair for mimic checks that
# the control finds knowledge where a stronger teacher helped; HMKD at a quarter of its weight
# asks whether its loss shrinks with its pull. The last three rows repeat, on these stages, the
# response terms and HMKD beside them with the full and the light HM, which only the eighth
# pair had run side by side.
HITUAV_CPU_CONTROLS = replace(
    HITUAV_CPU,
    name="hituav-cpu-controls",
    rows=(
        "none",
        "hmkd",
        "hmkd: random teacher",
        "mimic",
        "mimic: random teacher",
        "hmkd: quarter weight",
        "mimic: quarter weight",
        "mimic: random teacher, quarter weight",
        "class scores, boxes",
        "hmkd: light, sixteenth weight, class scores, boxes",
        "hmkd: sixteenth weight, class scores, boxes",
    ),
)

HITUAV_GPU = Preset(
    name="hituav-gpu",
    machine="1 GPU",
    data=_HITUAV,
    teacher={"backbone": "resnet50", "fpn_channels": 256},
    student={"backbone": "resnet18", "fpn_channels": 128},
    input_size=(512, 640),  # native resolution
    teacher_schedule={"iterations": 8000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    base_schedule={"iterations": 6000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    student_schedule={"iterations": 2000, "batch_size": 8, "lr": 5e-5, "warmup_iters": 100},
    eval_every=0,
    stage_eval_every=1000,
    jobs=1,
    threads=8,
    device="cuda",
    weights=calibrated("hituav-gpu"),
)

# The whole pipeline in about a minute, for the tests; its figures mean nothing.
SMOKE = Preset(
    name="smoke",
    machine="any",
    data={"kind": "digits", "train": 4, "val": 2, "tune": 2, "size": 64, "seed": 0, "max_side": 20},
    teacher={"backbone": "resnet18", "fpn_channels": 16},
    student={"backbone": "resnet18", "fpn_channels": 8},
    input_size=(64, 64),
    teacher_schedule={"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0},
    base_schedule={"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0},
    student_schedule={"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0},
    eval_every=0,
    stage_eval_every=0,
    seeds=(0, 1),
    rows=("none", "mimic", "fgd", "mgd", "hmkd"),
    jobs=2,
    threads=1,
    device="cpu",
)

PRESETS = {
    p.name: p
    for p in (
        CPU,
        CPU_SCRATCH,
        CPU_SCRATCH_GENERATIVE,
        GPU,
        HITUAV_CPU,
        HITUAV_CPU_LONG,
        HITUAV_CPU_NATIVE_TEACHER,
        HITUAV_CPU_NATIVE_TEACHER_CALIBRATED,
        HITUAV_CPU_LEVEL_CALIBRATED,
        HITUAV_CPU_STANDARDIZED,
        HITUAV_CPU_EXTENDED,
        HITUAV_CPU_EXTENDED_BASE,
        HITUAV_CPU_CONTROLS,
        HITUAV_GPU,
        SMOKE,
    )
}


@dataclass(frozen=True)
class Splits:
    """Where a preset's data lies: COCO (images, annotations) pairs for each split."""

    train: tuple[Path, Path]
    val: tuple[Path, Path]
    tune: tuple[Path, Path]


def with_data_root(preset: Preset, root: Path) -> Preset:
    """`preset` reading its COCO data set from `root` (a copy of it on another machine)."""
    if preset.data["kind"] != "coco":
        raise ValueError(f"{preset.name} makes its own data ({preset.data['kind']}); no root")
    return replace(preset, data={**preset.data, "root": str(root)})


def _model(
    preset: Preset,
    part: dict[str, Any],
    weights: str = "none",
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A detector of `part` at input `size` (default the preset's `input_size`)."""
    min_size, max_size = size or preset.input_size
    return {
        "arch": "faster_rcnn",
        "anchor_sizes": list(preset.anchors),
        "min_size": min_size,
        "max_size": max_size,
        "rpn_post_nms_top_n_train": 500,
        "box_batch_size_per_image": 128,
        "weights": weights,
        **part,
    }


def teacher_model(preset: Preset, weights: str = "none") -> dict[str, Any]:
    """The preset's teacher detector as the rows read it, a `ModelSpec` dict."""
    return _model(preset, preset.teacher, weights, preset.teacher_input_size)


def _split(pair: tuple[Path, Path]) -> dict[str, str]:
    return {"images": str(pair[0]), "annotations": str(pair[1])}


def base_spec(preset: Preset, splits: Splits, *, seed: int, stage: bool = False) -> dict:
    """The parts every run of a preset shares: data, schedule shape, evaluation, runtime."""
    return {
        "data": {"train": _split(splits.train), "val": _split(splits.val)},
        "schedule": {"optimizer": "adamw", "weight_decay": 1e-4, "scheduler": "cosine"},
        "eval": {"every": preset.stage_eval_every if stage else preset.eval_every},
        "checkpoint": {"every": 10_000_000},  # the bench re-runs a run rather than resume it
        "runtime": {"seed": seed, "device": preset.device, "log_every": 10},
    }


def _checked(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate now (a bad preset fails before any run starts) but hand on the dict: the run
    applies the library's defaults when it starts, as a user's YAML would get them."""
    TrainSpec.model_validate(spec)
    return spec


def teacher_spec(preset: Preset, splits: Splits) -> dict[str, Any]:
    spec = base_spec(preset, splits, seed=0, stage=True)
    spec["student"] = _model(preset, preset.teacher)
    spec["schedule"].update(preset.teacher_schedule)
    return _checked(spec)


def base_student_spec(preset: Preset, splits: Splits) -> dict[str, Any]:
    """The warm protocol's starting point: the student alone, to its plateau, seed 0."""
    if preset.base_schedule is None:
        raise ValueError(f"preset {preset.name} has no base schedule (protocol scratch)")
    spec = base_spec(preset, splits, seed=0, stage=True)
    spec["student"] = _model(preset, preset.student)
    spec["schedule"].update(preset.base_schedule)
    return _checked(spec)


def extension_spec(preset: Preset, splits: Splits, stage: str, previous: Path) -> dict[str, Any]:
    """One more chunk of `stage` (teacher or base), from its previous weights."""
    if preset.extension_schedule is None:
        raise ValueError(f"preset {preset.name} has no extension schedule")
    spec = base_spec(preset, splits, seed=0, stage=True)
    model = preset.teacher if stage == "teacher" else preset.student
    spec["student"] = _model(preset, model, weights=str(previous))
    schedule = preset.teacher_schedule if stage == "teacher" else preset.base_schedule or {}
    # the stage's own batch size, the chunk's length and rate
    spec["schedule"].update({**preset.extension_schedule, "batch_size": schedule["batch_size"]})
    return _checked(spec)


def teacher_resize_spec(preset: Preset, splits: Splits, previous: Path) -> dict[str, Any]:
    """The teacher's last chunk: from its previous weights, at `teacher_input_size`."""
    if preset.teacher_resize_schedule is None:
        raise ValueError(f"preset {preset.name} reads its teacher at the student's input size")
    spec = base_spec(preset, splits, seed=0, stage=True)
    spec["student"] = teacher_model(preset, weights=str(previous))
    spec["schedule"].update(preset.teacher_resize_schedule)
    return _checked(spec)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s values in place, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def row_distill(preset: Preset, row: str) -> dict[str, Any]:
    """A row's `DistillSpec` dict with the preset's overrides for it and its calibrated weight
    (and level weights, where calibrated per level) for its method."""
    distill = _merged(row_options(row), preset.row_overrides.get(row, {}))
    method = distill["method"]
    weight = preset.weights.get(method)
    if weight is not None and method != "none":
        distill["weight"] = weight * distill.get("weight", 1.0)
    levels = preset.level_weights.get(method)
    if levels and method != "none":  # a row's own level weights multiply the preset's
        own = distill.get("level_weights", {})
        merged = {lv: w * own.get(lv, 1.0) for lv, w in levels.items()}
        distill["level_weights"] = {**own, **merged}
    return distill


def student_spec(
    preset: Preset,
    splits: Splits,
    teacher_weights: Path | None,
    distill: dict[str, Any],
    *,
    seed: int,
    init: Path | None = None,
) -> dict[str, Any]:
    """A student run; `distill` is a `DistillSpec` dict; `init` the warm start's weights.
    `teacher_weights` may be None only for `method: none`, which reads no teacher."""
    spec = base_spec(preset, splits, seed=seed)
    spec["student"] = _model(preset, preset.student, weights=str(init) if init else "none")
    spec["distill"] = copy.deepcopy(distill)
    if distill.get("method", "none") != "none":
        if teacher_weights is None:
            raise ValueError(f"method {distill['method']} distils from a teacher; none given")
        spec["teacher"] = teacher_model(preset, weights=str(teacher_weights))
    spec["schedule"].update(preset.student_schedule)
    return _checked(spec)
