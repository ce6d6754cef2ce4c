"""The job spec: the hmkd_core training spec, unchanged, plus what the service needs to queue it.

One pydantic definition validates REST input and drives the worker. A distill job may name its
teacher's weights as `job:<id>` (the `student.pt` of an earlier job of the same team); the
service resolves that to a file before the worker sees it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hmkd_core.spec import TrainSpec

# `job:<id>`, the id whole or a prefix of at least 6 characters unique within the team
JOB_REF = re.compile(r"^job:([0-9a-f]{6,32})$")


def has_control_characters(text: str) -> bool:
    """NUL and the other C0/C1 control characters, and lone surrogates (what a JSON `\\ud800`
    escape decodes to): no id, name, cursor or path holds them, PostgreSQL refuses NUL in text
    outright, and a surrogate has no UTF-8 for a file name, a database or an answer."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in text)


def control_text_field(data: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first string or path (value or key) in `data` holding a control
    character or a lone surrogate, or None."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        return ".".join(path) or "<body>" if has_control_characters(data) else None
    if isinstance(data, dict):
        for key, value in data.items():
            name = str(key)
            if has_control_characters(name):
                return ".".join((*path, name.encode("unicode_escape").decode("ascii")))
            found = control_text_field(value, (*path, name))
            if found:
                return found
    if isinstance(data, list | tuple):
        for i, value in enumerate(data):
            found = control_text_field(value, (*path, str(i)))
            if found:
                return found
    return None


MAX_RUNTIME_S = 30 * 24 * 3600
MAX_RUNTIME_STOP = "ran past resources.max_runtime_s"  # the stop reason, as training reports it
PREEMPT_STOP = "preempted"  # the stop reason of a run asked to give its worker back


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gpus: int = Field(
        0, ge=0, le=64, description="GPUs (processes) per node; 0 runs on CPU with gloo."
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Machines the job spans: that many workers of its queue, each with `gpus` "
        "free GPUs, are reserved together (all or none) and run one torchrun group over a c10d "
        "rendezvous. On the CPU each node runs `runtime.nproc` processes.",
    )
    queue: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    priority: int = Field(0, ge=0, le=9, description="Higher runs first within a queue.")
    max_runtime_s: int | None = Field(
        None,
        ge=1,
        le=MAX_RUNTIME_S,
        description="Wall-clock seconds one attempt may train. Past it the run checkpoints and "
        "the job fails saying so; a retry resumes from that checkpoint with a new allowance. "
        "None: no limit.",
    )


class Retention(BaseModel):
    """What a job keeps of its checkpoints once it has succeeded; a failed or cancelled job
    keeps them all, for its retry to resume from. `student.pt`, `eval.json`, the metrics and
    the logs are always kept."""

    model_config = ConfigDict(extra="forbid")

    keep_latest: int = Field(
        1, ge=0, le=1000, description="Newest periodic checkpoints kept (0: none)."
    )
    keep_best: bool = Field(True, description="Keep `best.pt`, the checkpoint of the best eval.")


class JobSpec(TrainSpec):
    """A TrainSpec with a name, a kind and resources."""

    name: str = Field(..., min_length=1, max_length=200)
    kind: Literal["train", "distill", "evaluate"] = "train"
    resources: Resources = Field(default_factory=Resources)
    dataset: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}(@[0-9]{1,9})?$",
        description="A dataset of your team, `name` (its newest version) or `name@version`, in "
        "place of data.train/data.val. The stored spec pins the version and its paths.",
    )
    retention: Retention | None = Field(
        None,
        description="What to keep of the checkpoints after success. None: the team's policy, "
        "else keep the latest and the best.",
    )

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("name must be printable text")
        return v

    @model_validator(mode="after")
    def _kind_matches_method(self) -> JobSpec:
        method = self.distill.method
        if self.kind == "distill" and method == "none":
            raise ValueError("kind distill needs distill.method other than none")
        if self.kind == "train" and method != "none":
            raise ValueError(f"kind train trains without a teacher; use kind distill for {method}")
        if self.kind == "evaluate":
            if self.data.val is None:
                raise ValueError("kind evaluate needs data.val")
            if self.student.weights == "none":
                raise ValueError("kind evaluate needs student.weights (a path or job:<id>)")
            if self.resources.nodes > 1:
                raise ValueError("kind evaluate runs on one machine: resources.nodes must be 1")
        return self

    def teacher_job_id(self) -> str | None:
        """The job id named by `teacher.weights: job:<id>`, if any."""
        if self.teacher is None:
            return None
        m = JOB_REF.match(self.teacher.weights)
        return m.group(1) if m else None

    def student_job_id(self) -> str | None:
        m = JOB_REF.match(self.student.weights)
        return m.group(1) if m else None

    def processes(self) -> int:
        """The training processes of the whole job: on each node one per GPU, or on the CPU
        the spec's own `runtime.nproc`."""
        per_node = self.resources.gpus if self.resources.gpus > 0 else self.runtime.nproc
        return self.resources.nodes * per_node

    def train_spec(self) -> TrainSpec:
        """What hmkd_core runs: the training fields, with nproc/device from resources.

        `gpus: N` runs N processes on N GPUs (NCCL); `gpus: 0` runs on the CPU with the spec's
        own `runtime.nproc` processes (gloo).
        """
        data = self.model_dump(exclude={"name", "kind", "resources", "retention", "dataset"})
        runtime = data["runtime"]
        if self.resources.gpus > 0:
            runtime["nproc"] = self.resources.gpus
            runtime["device"] = "cuda"
        else:
            runtime["device"] = "cpu"
        return TrainSpec.model_validate(data)
