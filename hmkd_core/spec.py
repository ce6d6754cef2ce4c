"""The training spec: one pydantic model, validated once at the edge.

The same model is read from YAML/JSON by `hmkd train` and, unchanged, embedded in the
service's job spec, so a run behaves the same whichever door it came through. Unknown keys are
refused (``extra="forbid"``) because a misspelt option silently falling back to its default is
the worst kind of bug in an experiment.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

LEVELS = ("p2", "p3", "p4", "p5", "p6", "p7")
# The FPN levels each detector has, and those distilled when a spec names none.
PYRAMIDS = {
    "faster_rcnn": ("p2", "p3", "p4", "p5", "p6"),
    "retinanet": ("p3", "p4", "p5", "p6", "p7"),
}
DEFAULT_LEVELS = {"faster_rcnn": ("p2", "p3", "p4"), "retinanet": ("p3", "p4", "p5")}
# What an evaluation reports, besides `AP_<name>` for each of `eval.extra_area_ranges`.
REPORTED_METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR@100")
# Counts stored by the service in 32-bit columns, and far past any real schedule.
MAX_ITERATIONS = 100_000_000
MAX_SEED = 2**31 - 1


def deep_levels(levels: Iterable[str], count: int = 2) -> tuple[str, ...]:
    """The `count` pyramid levels just coarser than the coarsest distilled one: p2..p4 -> p5,
    p6. What `hmkd.hm.query_levels: deep` reads from the teacher."""
    coarsest = max(int(lv[1:]) for lv in levels)
    return tuple(f"p{coarsest + k}" for k in range(1, count + 1))


# Per-level loss multipliers, by FPN level name; a level not named keeps 1.
LevelWeights = dict[str, Annotated[float, Field(ge=0.0)]]


def _known_level_names(names: Iterable[str]) -> Iterable[str]:
    """`names` (a list of levels, or a mapping keyed by level) if every one is an FPN level."""
    bad = [lv for lv in names if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown level(s) {bad}; choose from {list(LEVELS)}")
    return names


def resolve_level_weights(
    levels: Sequence[str], weights: Mapping[str, float], field: str
) -> dict[str, float]:
    """Each distilled level's multiplier: its named weight, or 1.

    A weight other than 1 for a level that is not distilled is refused, naming `field`: it
    would silently do nothing (e.g. `p2` on a RetinaNet, whose finest level is P3).
    """
    stray = {lv: wt for lv, wt in weights.items() if lv not in levels and wt != 1.0}
    if stray:
        raise ValueError(
            f"{field}: level(s) {sorted(stray)} are not distilled ({list(levels)}); "
            "remove them or distil those levels"
        )
    return {lv: float(weights.get(lv, 1.0)) for lv in levels}


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field path and what is wrong."""


def _wants_number(annotation: Any) -> bool:
    """Whether a field of this type takes a number and never a boolean (`float`, `int | None`,
    `Annotated[float, ...]`)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    options = options or (annotation,)
    return bool not in options and any(t in (int, float) for t in options)


def _booleans_refused(value: Any, annotation: Any, where: str) -> None:
    if isinstance(value, bool) and _wants_number(annotation):
        raise ValueError(f"{where}expected a number, got {str(value).lower()}")
    if isinstance(value, dict) and get_origin(annotation) is dict:
        for key, item in value.items():
            _booleans_refused(item, get_args(annotation)[1], f"{key}: ")


class StrictModel(BaseModel):
    """What every model read from a user refuses: unknown keys (a misspelt option would fall
    back to its default), non-finite floats (no weight or rate is meaningful as inf or NaN,
    and PostgreSQL's JSON cannot store them) and booleans given for numbers."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `true` as 1 where a number is expected: `"lr": true` would train at
        lr 1 without a word. Strings stay accepted (YAML reads `1e-4` as one)."""
        if info.field_name is not None:
            _booleans_refused(value, cls.model_fields[info.field_name].annotation, "")
        return value


class DatasetSplit(StrictModel):
    """A COCO-format split: an image folder and its annotation file."""

    images: Path
    annotations: Path


class DataSpec(StrictModel):
    train: DatasetSplit
    val: DatasetSplit | None = None
    hflip: bool = Field(True, description="Random horizontal flip during training.")
    num_workers: int = Field(0, ge=0, le=64)


# `ModelSpec.weights` values that name weights instead of a file: no weights, torchvision's
# ImageNet backbone, torchvision's COCO detector
NAMED_WEIGHTS = ("none", "imagenet", "coco")
# The backbones torchvision publishes a COCO-trained detector for (Faster R-CNN and RetinaNet)
COCO_WEIGHTS_BACKBONES = ("resnet50",)


def coco_weights_refusal(backbone: str) -> str | None:
    """Why `weights: coco` cannot build a detector on `backbone`, or None when it can."""
    if backbone in COCO_WEIGHTS_BACKBONES:
        return None
    return (
        f"COCO weights exist for {' and '.join(COCO_WEIGHTS_BACKBONES)} detectors only, not "
        f"{backbone}; use weights: imagenet or a path"
    )


class ModelSpec(StrictModel):
    """A torchvision detector, built from parts by `hmkd_core.models.build_detector`."""

    arch: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    fpn_channels: int = Field(256, ge=8, le=1024)
    anchor_sizes: list[int] | None = Field(
        None,
        description="Anchor side per pyramid level, finest first; small objects need small "
        "anchors. Default: 16..256 (Faster R-CNN, P2..P6) or 16..256 (RetinaNet, P3..P7).",
    )
    min_size: int = Field(
        800,
        ge=32,
        le=4096,
        description="Shorter side after resize. A teacher's: the student's, or the student's "
        "times 2 or 4 with max_size alike (a teacher reading the images at a higher "
        "resolution).",
    )
    max_size: int = Field(1333, ge=32, le=8192, description="Cap on the longer side.")
    weights: str = Field(
        "none",
        description="none | imagenet (backbone) | coco (whole detector; resnet50 only) | a "
        "path to a student.pt or checkpoint written by this library.",
    )
    trainable_backbone_layers: int = Field(5, ge=0, le=5)
    backbone_norm: Literal["auto", "frozen_bn", "bn", "gn"] = Field(
        "auto",
        description="auto: frozen BatchNorm over pretrained weights, GroupNorm from scratch "
        "(BatchNorm statistics from 2-image batches are noise).",
    )
    rpn_post_nms_top_n_train: int = Field(
        2000, ge=1, le=100_000, description="Faster R-CNN proposals kept per image in training."
    )
    box_batch_size_per_image: int = Field(
        512,
        ge=1,
        le=100_000,
        description="Faster R-CNN RoIs sampled per image for the box head loss.",
    )
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225),
        description="Per-channel divisor of the normalised image; none may be 0.",
    )

    @field_validator("anchor_sizes")
    @classmethod
    def _positive_anchors(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if len(v) != 5:
                raise ValueError("needs exactly 5 sizes, one per pyramid level")
            if any(s <= 0 or s > 8192 for s in v):
                raise ValueError("sizes must be between 1 and 8192 pixels")
        return v

    @field_validator("image_std")
    @classmethod
    def _divisible(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x == 0 for x in v):
            raise ValueError(f"{list(v)}: the image is divided by it, so no channel's may be 0")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> ModelSpec:
        if self.max_size < self.min_size:
            raise ValueError("max_size must be >= min_size")
        if self.weights == "coco" and (why := coco_weights_refusal(self.backbone)):
            raise ValueError(f"weights: {why}")
        return self


class HMOptions(StrictModel):
    """Hierarchical matching: teacher-side queries attend to the student's features."""

    enabled: bool = True
    query_source: Literal["teacher", "student"] = "teacher"
    query_levels: Literal["distilled", "deep"] = Field(
        "distilled",
        description="What the encoder reads: the distilled levels (P2..P4), or only the two "
        "pyramid levels coarser than them (P5, P6), so a level's own teacher feature never "
        "feeds the query matched against it.",
    )
    dim: int = Field(
        64,
        ge=8,
        le=1024,
        description="Width of queries, keys and values. The window attention's cost is linear "
        "in it. At 64 HMKD's step was within 1.10x of the floor on the SmallDigits CPU "
        "benchmark and 1.07x to 1.15x on HIT-UAV's; 16 with one head and query_levels deep "
        "brought it to 1.05x there with no measurable loss of AP_S "
        "(docs/results-hituav-eighth.md); 128 doubles the distiller's time.",
    )
    heads: int = Field(4, ge=1, le=64)
    window: int = Field(3, ge=1, le=15)
    level_weights: LevelWeights = Field(
        default_factory=lambda: {"p2": 1.0, "p3": 1.0, "p4": 1.0},
        description="Multiplies HM's loss at each level (SDM's terms are not affected; "
        "distill.level_weights multiplies both).",
    )
    background_weight: float = Field(
        0.5, ge=0.0, description="Weight of background cells relative to foreground in WeightedMSE."
    )
    cell_weights: Literal["masks", "uniform"] = Field(
        "masks",
        description="How WeightedMSE weighs a level's cells: by the scale-aware masks (each box "
        "and the background share a total of one), or every cell alike (MGD's plain sum).",
    )
    generator: bool = Field(
        False,
        description="Pass each decoded level through a conv3x3-ReLU-conv3x3 generator (MGD's) "
        "before comparing it with the teacher, so the student's values need only hold what "
        "a small network can rebuild the teacher's feature from, not be a linear map of it.",
    )
    generator_kernel: Literal[1, 3] = Field(
        3,
        description="The generator's kernel: 3 as MGD's; 1 for conv1x1-ReLU-conv1x1, about a "
        "ninth of the generator's cost, leaving the neighbourhood to the decoder's attention.",
    )
    mask_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of the aligned student's positions zeroed (across all channels) "
        "before the decoder reads them, as MGD masks its input; 0 keeps every position.",
    )
    query_pool: Literal["none", "image"] = Field(
        "none",
        description="`image` averages the encoder's query over each image's positions before "
        "decoding, so the query keeps what the teacher's features say about the image but "
        "not where: the teacher can no longer pick a different mixture of neighbours for "
        "each cell. `none` keeps the query's map.",
    )
    value_grad: Literal["window", "own"] = Field(
        "window",
        description="`own` sends each of the student's values only the gradient of its own "
        "cell's prediction, as if its neighbours' values were detached (the forward still "
        "mixes the window): a cell's error is then not spread over the values around it. "
        "`window` is the attention's true gradient.",
    )

    _level_names = field_validator("level_weights")(_known_level_names)

    @field_validator("window")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("window must be odd so it is centred on its position")
        return v

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> HMOptions:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.query_source == "student" and self.query_levels == "deep":
            raise ValueError(
                "query_levels 'deep' reads the teacher's deep levels; it needs query_source "
                "teacher (the student's deep levels have no adapter to the teacher's width)"
            )
        return self


class FocalOptions(StrictModel):
    """The focal (foreground/background, attention-weighted) feature terms of SDM and FGD."""

    enabled: bool = True
    alpha: float = Field(1.0, ge=0.0, description="Foreground term weight.")
    beta: float = Field(0.5, ge=0.0, description="Background term weight (< alpha).")
    gamma: float = Field(0.5, ge=0.0, description="Attention-transfer term weight.")
    temperature: float = Field(0.5, gt=0.0)
    normalize: bool = Field(
        False,
        description="Divide the attention maps' activity by its per-image mean before the "
        "softmax, so the temperature does not depend on the teacher's feature scale.",
    )


class HMKDOptions(StrictModel):
    hm: HMOptions = Field(default_factory=HMOptions)
    sdm: FocalOptions = Field(default_factory=FocalOptions)
    # The losses are sums over positions and channels of squared FPN differences, so their
    # scale follows the teacher's feature magnitude. Calibrated on SmallDigits so each term
    # starts near the detection loss (docs/calibration.md: 5e-5 and 2e-5), then tuned on a
    # held-out split (docs/tuning.md): weights x3 and x10 lowered AP_S, x0.3 gave the best
    # HMKD student, so the defaults are 0.3 times the calibrated values.
    w_hm: float = Field(1.5e-5, ge=0.0)
    w_sdm: float = Field(6e-6, ge=0.0)

    @model_validator(mode="after")
    def _something_on(self) -> HMKDOptions:
        if not (self.hm.enabled or self.sdm.enabled):
            raise ValueError("hmkd needs hm or sdm enabled (use method: none for neither)")
        if self.sdm.enabled and self.sdm.beta >= self.sdm.alpha > 0:
            raise ValueError("sdm.beta must be below sdm.alpha: background is damped, not boosted")
        return self


class MimicOptions(StrictModel):
    weight: float = Field(0.02, ge=0.0, description="Calibrated like HMKDOptions.w_hm.")


class FGDOptions(StrictModel):
    """FGD's official Faster R-CNN ratios: beta = alpha / 2, the attention weight gamma equal
    to alpha, the global (GcBlock) weight alpha / 100; temperature 0.5."""

    focal: FocalOptions = Field(
        default_factory=lambda: FocalOptions(alpha=1.0, beta=0.5, gamma=1.0, temperature=0.5)
    )
    global_weight: float = Field(0.01, ge=0.0, description="GcBlock relation loss weight.")
    weight: float = Field(3e-5, ge=0.0, description="Calibrated like HMKDOptions.w_hm.")


class MGDOptions(StrictModel):
    mask_ratio: float = Field(
        0.45, ge=0.0, lt=1.0, description="MGD's ratio for detection (0.65 is its ImageNet one)."
    )
    weight: float = Field(2e-7, ge=0.0, description="Calibrated like HMKDOptions.w_hm.")


class ResponseOptions(StrictModel):
    """Response distillation on what the student's heads were trained on, added to any feature
    method: the class scores and box deltas of its sampled RoIs, and its RPN's objectness.

    Feature methods pull the student's FPN maps toward the teacher's; a warm student can pay
    for that pull in detection quality. These terms ask instead that the student's heads answer
    as the teacher's heads answer the same RoIs and anchors: the teacher's knowledge reaches the
    student through the outputs it is judged on (Hinton et al.'s soft targets).
    """

    weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the temperature-scaled KL divergence between the teacher's and "
        "the student's class scores on the student's sampled RoIs (0: off). Faster R-CNN "
        "student and teacher only.",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Softmax temperature of both sides' class scores."
    )
    box_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the smooth-L1 from the student's box deltas to the teacher's, "
        "for each sampled RoI that holds an object, for its class, where the teacher's deltas "
        "are nearer the ground truth than the student's; 1 pulls as hard as the detector's "
        "own box loss (0: off). Faster R-CNN student and teacher only.",
    )
    objectness_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the KL divergence between the teacher's and the student's RPN "
        "object probability at every anchor; 1 pulls an anchor as hard as the RPN's own loss "
        "pulls a sampled one (0: off). Faster R-CNN student and teacher only.",
    )

    @property
    def active(self) -> list[str]:
        """The options whose term is on, by name."""
        return [n for n in ("weight", "box_weight", "objectness_weight") if getattr(self, n) > 0]


# The distillation methods: the one list the spec, the distiller registry, the API's filter,
# the dashboard (through GET /v1/methods) and the benchmark's rows all read. A method is added
# here, with its options block on DistillSpec and its class in hmkd_core.distill.registry.
Method = Literal["none", "mimic", "fgd", "mgd", "hmkd"]
METHODS: tuple[str, ...] = get_args(Method)
BASELINE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in ("none", "hmkd"))
METHOD_SUMMARIES: dict[str, str] = {
    "none": "the student trained alone, without a teacher",
    "mimic": "mean squared error between the aligned student and teacher features",
    "fgd": "Focal and Global Distillation (Yang et al., CVPR 2022)",
    "mgd": "Masked Generative Distillation (Yang et al., ECCV 2022)",
    "hmkd": "Hierarchical Matching KD for small objects (Ma et al., JCST 2024)",
}
assert tuple(METHOD_SUMMARIES) == METHODS


class DistillSpec(StrictModel):
    method: Method = "none"
    levels: list[str] | None = Field(
        None, description="Distilled levels; default p2,p3,p4 (the three finest the detector has)."
    )
    weight: float = Field(
        1.0,
        ge=0.0,
        description="Multiplies the feature method's whole loss (distill.response has its own).",
    )
    warmup_iters: int = Field(
        0,
        ge=0,
        le=MAX_ITERATIONS,
        description="Ramp the distillation losses linearly from 0 to full weight over this many "
        "iterations (0: full weight from the start).",
    )
    align_iters: int = Field(
        0,
        ge=0,
        le=MAX_ITERATIONS,
        description="For this many first iterations the distillation losses train only the "
        "distiller (adapters, matching, attention), on detached student features; the student "
        "then meets a distiller fitted to its features, not a random one (0: from the start).",
    )
    clip_apart: bool = Field(
        False,
        description="Clip the distiller's gradient norm (schedule.clip_grad_norm) apart from "
        "the student's: a distiller with large gradients of its own then never shrinks the "
        "student's step (false: one norm over both, as before).",
    )
    level_weights: LevelWeights = Field(
        default_factory=dict,
        description="Multiplies every term of the feature method at each named level (a "
        "level not named keeps 1), on top of `weight`. The detector's own gradient differs "
        "from level to level (on HIT-UAV it is 10 to 13 times larger at P2 than at P3 or P4), so "
        "one weight for all levels can pull one level several times as hard as the detector "
        "does and another at a fraction of it; per-level weights set from the gradient "
        "ratio (`python -m bench.calibrate --per-level`) even that out.",
    )
    standardize: bool = Field(
        False,
        description="Compare the feature method's student and teacher maps standardized per "
        "image and channel (zero mean, unit variance over positions; Pearson-correlation "
        "distillation): the student is pulled toward the teacher's pattern of activity, not "
        "its magnitudes. The student side is standardized after its adapter. The focal "
        "terms' attention (SDM, FGD) is then computed from standardized maps too, where every "
        "channel has unit variance: the channel attention is near uniform.",
    )
    hmkd: HMKDOptions = Field(default_factory=HMKDOptions)
    mimic: MimicOptions = Field(default_factory=MimicOptions)
    fgd: FGDOptions = Field(default_factory=FGDOptions)
    mgd: MGDOptions = Field(default_factory=MGDOptions)
    response: ResponseOptions = Field(default_factory=ResponseOptions)

    _level_names = field_validator("level_weights")(_known_level_names)

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            _known_level_names(v)
            if len(set(v)) != len(v) or not v:
                raise ValueError("levels must be distinct and non-empty")
        return v


class ScheduleSpec(StrictModel):
    iterations: int = Field(1000, ge=1, le=MAX_ITERATIONS)
    batch_size: int = Field(2, ge=1, le=1024, description="Images per process per iteration.")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(100, ge=0, le=MAX_ITERATIONS)
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    scheduler: Literal["step", "cosine", "constant"] = "step"
    steps: list[float] = Field(
        default_factory=lambda: [0.67, 0.89],
        description="Step decay points as fractions of iterations.",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    clip_grad_norm: float | None = Field(10.0, gt=0.0)

    @field_validator("steps")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < s < 1.0 for s in v) or v != sorted(v):
            raise ValueError("steps must be increasing fractions in (0, 1)")
        return v


# COCOeval's own area range labels, which an extra range may not reuse
COCO_AREA_RANGES = frozenset({"all", "small", "medium", "large", "S", "M", "L"})
MAX_AREA_RANGE_NAME = 64


def check_area_ranges(
    ranges: Mapping[str, tuple[float, float]],
) -> dict[str, tuple[float, float]]:
    """Extra COCO area ranges, checked once for the spec at submit and for the evaluator: each
    becomes a metric `AP_<name>`, so the name must not shadow COCO's and must be a plain key."""
    for name, bounds in ranges.items():
        if name in COCO_AREA_RANGES:
            raise ValueError(
                f"extra area range {name!r} clashes with a standard COCO range; rename it"
            )
        if (
            not (0 < len(name) <= MAX_AREA_RANGE_NAME and name.isprintable())
            or name.strip() != name
        ):
            raise ValueError(
                f"extra area range name {name!r}: use 1 to {MAX_AREA_RANGE_NAME} printable "
                "characters, without spaces around them"
            )
        if (
            len(bounds) != 2
            or not 0 <= bounds[0] < bounds[1]
            or not all(math.isfinite(b) for b in bounds)
        ):
            raise ValueError(
                f"extra area range {name!r} is {tuple(bounds)!r}; give finite (min, max) areas "
                "in px² with 0 <= min < max"
            )
    return dict(ranges)


class EvalSpec(StrictModel):
    every: int = Field(
        0, ge=0, le=MAX_ITERATIONS, description="Evaluate every N iterations (0: only at the end)."
    )
    batch_size: int = Field(4, ge=1, le=1024)
    extra_area_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "tiny": (0.0, 8.0**2),
            "xsmall": (8.0**2, 16.0**2),
            "small16_32": (16.0**2, 32.0**2),
        },
        description="Additional COCO area ranges (pixels^2) reported as AP_<name>: a name of "
        f"1 to {MAX_AREA_RANGE_NAME} printable characters other than COCO's own ranges', and "
        "finite bounds with 0 <= min < max.",
    )
    metric: str = Field("AP_S", description="Metric that picks the best checkpoint.")

    @field_validator("extra_area_ranges")
    @classmethod
    def _area_ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return check_area_ranges(v)

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str, info: ValidationInfo) -> str:
        """Checked here, not after the last evaluation of a run hours long."""
        ranges = info.data.get("extra_area_ranges") or {}
        known = [*REPORTED_METRICS, *(f"AP_{name}" for name in ranges)]
        if v not in known:
            raise ValueError(f"{v!r} is not reported by the evaluation; choose from {known}")
        return v


class CheckpointSpec(StrictModel):
    every: int = Field(
        500, ge=1, le=MAX_ITERATIONS, description="Write a resumable checkpoint every N iterations."
    )
    keep: int = Field(2, ge=1, le=1000, description="How many periodic checkpoints to keep.")


class RuntimeSpec(StrictModel):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU.")
    nproc: int = Field(1, ge=1, le=64, description="Processes (one per GPU; gloo on CPU).")
    log_every: int = Field(10, ge=1, le=MAX_ITERATIONS)
    deterministic: bool = Field(
        False,
        description="Deterministic kernels only, where PyTorch has them (training on the CPU "
        "repeats bit for bit either way); on CUDA, torchvision's RoIAlign backward has none "
        "and warns instead of failing the run.",
    )


class TrainSpec(StrictModel):
    """Everything one training or distillation run needs; nothing about where it runs from."""

    data: DataSpec
    student: ModelSpec
    teacher: ModelSpec | None = None
    distill: DistillSpec = Field(default_factory=DistillSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    @model_validator(mode="after")
    def _teacher_when_distilling(self) -> TrainSpec:
        if self.distill.method != "none" and self.teacher is None:
            raise ValueError(f"distill.method {self.distill.method!r} needs a teacher")
        if self.distill.method != "none" and self.distill.align_iters >= self.schedule.iterations:
            raise ValueError(
                f"distill.align_iters: {self.distill.align_iters} leaves none of the "
                f"{self.schedule.iterations} iterations in which the teacher reaches the student"
            )
        on = self.distill.response.active
        if on:
            field = f"distill.response.{on[0]}"
            if self.distill.method == "none":
                raise ValueError(
                    f"{field}: response distillation needs a teacher; set distill.method to a "
                    "distillation method (its weight may be 0)"
                )
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                if model is not None and model.arch != "faster_rcnn":
                    raise ValueError(
                        f"{field}: class scores, box deltas and objectness per RoI and anchor "
                        f"need a Faster R-CNN {role}; {role}.arch is {model.arch!r}"
                    )
            if self.teacher is not None and self.teacher.weights in ("coco", "imagenet"):
                raise ValueError(
                    f"{field}: response distillation needs a teacher whose heads were trained "
                    f"on this dataset's classes; teacher.weights is {self.teacher.weights!r}, "
                    "whose box predictor starts at random"
                )
        if self.teacher is not None and self.teacher.weights == "none":
            raise ValueError("teacher.weights must name trained weights (a path, or coco)")
        return self

    @model_validator(mode="after")
    def _pair_aligns(self) -> TrainSpec:
        """What would otherwise fail only when the run starts (or distil garbage): the teacher
        reads the student's input size or a whole multiple of it, and both pyramids hold every
        distilled level. Errors start with the field at fault, which the API reports as the
        error's field."""
        if self.teacher is None:
            return self
        scale = teacher_input_scale(self.student, self.teacher)
        if scale > 1 and self.distill.response.objectness_weight > 0:
            raise ValueError(
                f"distill.response.objectness_weight: objectness is compared anchor by anchor, "
                f"and a teacher at {scale}x the student's input size has other anchors; set "
                "teacher.min_size and teacher.max_size to the student's, or this weight to 0"
            )
        levels = list(self.distill.levels or DEFAULT_LEVELS[self.student.arch])
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            missing = [lv for lv in levels if lv not in PYRAMIDS[model.arch]]
            if missing:
                raise ValueError(
                    f"distill.levels: {role} ({model.arch}) has no level(s) {missing}; it has "
                    f"{list(PYRAMIDS[model.arch])}"
                )
        if self.distill.method != "none":
            resolve_level_weights(levels, self.distill.level_weights, "distill.level_weights")
        if self.distill.method == "hmkd" and self.distill.hmkd.hm.enabled:
            resolve_level_weights(
                levels, self.distill.hmkd.hm.level_weights, "distill.hmkd.hm.level_weights"
            )
            numbers = sorted(int(lv[1:]) for lv in levels)
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                raise ValueError(
                    f"distill.levels: hierarchical matching needs consecutive FPN levels, got "
                    f"{levels}; e.g. {list(DEFAULT_LEVELS[self.student.arch])}"
                )
            if self.distill.hmkd.hm.query_levels == "deep":
                pyramid = PYRAMIDS[self.teacher.arch]
                missing = [lv for lv in deep_levels(levels) if lv not in pyramid]
                if missing:
                    raise ValueError(
                        f"distill.hmkd.hm.query_levels: 'deep' reads the teacher's two levels "
                        f"coarser than {levels}, and the teacher ({self.teacher.arch}) has no "
                        f"{missing} (it has {list(pyramid)}); distil finer levels or use "
                        "query_levels: distilled"
                    )
        return self


TEACHER_SCALES = (1, 2, 4)


def teacher_input_scale(student: ModelSpec, teacher: ModelSpec) -> int:
    """How many times the student's input size the teacher reads: one of `TEACHER_SCALES`,
    multiplying both `min_size` and `max_size`.

    At 1 the teacher runs on the student's own transformed batch. Above it the teacher resizes
    the same images itself, so a teacher trained at full resolution can teach a student that
    reads them downscaled (small objects are what downscaling loses); its feature maps are
    then `scale` times the student's and pool onto the student's grid, and the student's RoIs
    scale up onto the teacher's image. Powers of two only: a level's cells then nest in the
    student's, and resizing by twice or four times a factor rounds to at most `scale - 1`
    pixels past the student's size times `scale`, never short of it. Errors start with the
    field at fault.
    """
    for name in ("image_mean", "image_std"):
        s, t = getattr(student, name), getattr(teacher, name)
        if s != t:
            raise ValueError(
                f"teacher.{name}: {t} differs from student.{name} ({s}); both detectors must "
                "normalise the images alike"
            )
    for scale in TEACHER_SCALES:
        if teacher.min_size == scale * student.min_size:
            if teacher.max_size == scale * student.max_size:
                return scale
            raise ValueError(
                f"teacher.max_size: {teacher.max_size}, but teacher.min_size is {scale}x the "
                f"student's, so max_size must be too: {scale * student.max_size}"
            )
    allowed = ", ".join(str(k * student.min_size) for k in TEACHER_SCALES)
    raise ValueError(
        f"teacher.min_size: {teacher.min_size}; the teacher reads the student's input size "
        f"({student.min_size}) times {', '.join(map(str, TEACHER_SCALES))}: one of {allowed}, "
        "with max_size alike"
    )


# A check across fields (`TrainSpec._pair_aligns`, `ModelSpec._sizes`) starts its message
# with the field at fault, relative to the model it checks
_FIELD_FIRST = re.compile(r"^Value error, ([a-z_]+(?:\.[a-z_0-9]+)*): (.*)$", re.DOTALL)


def located(loc: tuple[Any, ...], msg: str) -> tuple[tuple[Any, ...], str]:
    """A validation error's location and message, with the field a cross-field check names at
    the start of its message moved into the location (`teacher` + "weights: ..." ->
    `teacher.weights`), so the CLI and the API name the same field."""
    if (m := _FIELD_FIRST.match(msg)) is not None:
        return (*loc, *m.group(1).split(".")), m.group(2)
    return loc, msg


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """One line per problem, each naming the dotted field path, e.g. `schedule.lr: ...`."""
    lines = []
    for e in err.errors():
        loc, msg = located(tuple(e["loc"]), e["msg"])
        path = ".".join(str(p) for p in loc) or "<root>"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_spec(data: dict[str, Any], source: str = "spec") -> TrainSpec:
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_spec(path: str | Path) -> TrainSpec:
    """Read a YAML or JSON spec; relative dataset/weights paths resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read spec: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError(f"{path}: not valid {kind}: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping at the top level")
    spec = parse_spec(data, source=str(path))
    return resolve_paths(spec, path.parent)


def resolve_paths(spec: TrainSpec, base: Path) -> TrainSpec:
    """Make relative paths absolute against `base`, so a run directory records real locations."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    spec = spec.model_copy(deep=True)
    for split in (spec.data.train, spec.data.val):
        if split is not None:
            split.images = fix(split.images)
            split.annotations = fix(split.annotations)
    for model in (spec.student, spec.teacher):
        if model is not None and model.weights not in NAMED_WEIGHTS:
            model.weights = str(fix(Path(model.weights)))
    return spec
