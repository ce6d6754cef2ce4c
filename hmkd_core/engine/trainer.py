"""One trainer for plain training (teachers) and distillation, on one process or many.

The loop is short on purpose: `step()` does forward, backward, finiteness check, clip, step;
evaluation, checkpointing, reporting and stopping are calls to collaborators at fixed points.
Everything that decides what happens next (iteration, epoch position, RNG states, optimizer,
scheduler, scaler, best metric) lives in the checkpoint, so a stopped run resumes bit-exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hmkd_core.atomic import remove_orphans
from hmkd_core.data import CocoDetectionDataset, collate_detection
from hmkd_core.data.coco import category_names, check_same_categories
from hmkd_core.distill import build_distiller, build_response
from hmkd_core.engine.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from hmkd_core.engine.distributed import DistContext, any_true, gather_objects
from hmkd_core.engine.evaluate import evaluate_detector, evaluation_ranges
from hmkd_core.engine.module import FrozenTeacher, TrainModule, check_pair
from hmkd_core.engine.optim import build_optimizer, build_scheduler, clip_groups, param_groups
from hmkd_core.engine.reporter import MultiReporter, Progress, Reporter
from hmkd_core.engine.sampler import ResumableSampler
from hmkd_core.engine.tensorboard import TensorBoardReporter
from hmkd_core.evaluation import write_eval_json
from hmkd_core.models import StudentHeader, build_detector, export_student
from hmkd_core.models.export import check_trained_on, labels_compared
from hmkd_core.spec import DEFAULT_LEVELS, TrainSpec

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the message names the component and the iteration."""


def distill_ramp(iteration: int, warmup_iters: int) -> float:
    """The distillation losses' factor at `iteration` (0-based): linear from 1/warmup to 1.

    A student whose adapters and HM modules start random gets large, uninformative feature
    gradients in its first steps; ramping the distillation in lets the detection loss keep
    the lead until the adapters have learnt something.
    """
    if warmup_iters <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup_iters)


class Trainer:
    def __init__(
        self,
        spec: TrainSpec,
        out_dir: Path,
        ctx: DistContext,
        reporter: Reporter,
        *,
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.spec, self.out_dir, self.ctx = spec, out_dir, ctx
        # Every run gets event files next to metrics.jsonl, whoever launched it; only rank 0
        # reports, so only rank 0 opens a writer.
        self.tensorboard = TensorBoardReporter(out_dir / "tensorboard")
        self.reporter: Reporter = MultiReporter(reporter, self.tensorboard)
        torch.manual_seed(spec.runtime.seed * 1000 + ctx.rank)
        self.train_set = CocoDetectionDataset(
            spec.data.train.images,
            spec.data.train.annotations,
            train=True,
            hflip=spec.data.hflip,
            seed=spec.runtime.seed,
        )
        self.val_set = (
            CocoDetectionDataset(spec.data.val.images, spec.data.val.annotations)
            if spec.data.val is not None
            else None
        )
        if self.val_set is not None:
            check_same_categories(
                category_names(self.train_set.categories),
                category_names(self.val_set.categories),
                self.val_set.annotation_file,
            )
        self.module = self._build_module().to(ctx.device)
        self.student = self.module.student
        trainable = [self.module.student] + (
            [self.module.distiller] if self.module.distiller else []
        )
        self.optimizer = build_optimizer(
            param_groups(trainable, spec.schedule.weight_decay), spec.schedule
        )
        self.scheduler = build_scheduler(self.optimizer, spec.schedule)
        self.clip_groups = clip_groups(trainable, spec.distill.clip_apart)
        self.amp = spec.runtime.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
        self.model: torch.nn.Module = (
            DistributedDataParallel(
                self.module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
            )
            if ctx.distributed
            else self.module
        )
        self.sampler = ResumableSampler(
            self.train_set,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            seed=spec.runtime.seed,
            batch_size=spec.schedule.batch_size,
        )
        if self.sampler.batches_per_epoch() == 0:
            raise ValueError(
                f"{spec.data.train.annotations}: {len(self.train_set)} images cannot fill one "
                f"batch of {spec.schedule.batch_size} per process on {ctx.world_size} process(es)"
            )
        self.checkpoints = CheckpointManager(
            checkpoint_dir or out_dir / "checkpoints", keep=spec.checkpoint.keep
        )
        self.iteration = 0
        self.epoch = 0
        self.batches_done = 0
        self.best: dict[str, Any] = {"metric": spec.eval.metric, "value": None, "iteration": None}
        self.last_eval: dict[str, Any] | None = None

    # ---- construction -------------------------------------------------------------------
    def _build_module(self) -> TrainModule:
        spec = self.spec
        n = self.train_set.num_classes
        student = build_detector(spec.student, n)
        if spec.distill.method == "none":
            return TrainModule(student)
        assert spec.teacher is not None
        same = labels_compared(spec, "teacher", evaluate=False)
        check_trained_on(spec.teacher.weights, self.train_set.categories, same_classes=same)
        levels = tuple(spec.distill.levels or DEFAULT_LEVELS[spec.student.arch])
        scale = check_pair(spec.student, spec.teacher, levels)
        teacher = FrozenTeacher(build_detector(spec.teacher, n), scale).to(self.ctx.device)
        distiller = build_distiller(
            spec.distill,
            levels=levels,
            student_channels=spec.student.fpn_channels,
            teacher_channels=teacher.out_channels,
        )
        return TrainModule(student, distiller, teacher, build_response(spec.distill))

    def _batches(self) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
        """Endless batches; the position (epoch, batches_done) is kept for checkpoints."""
        while True:
            self.sampler.set_position(self.epoch, self.batches_done)
            self.train_set.set_epoch(self.epoch)
            loader = DataLoader(
                self.train_set,
                batch_size=self.spec.schedule.batch_size,
                sampler=self.sampler,
                num_workers=self.spec.data.num_workers,
                collate_fn=collate_detection,
                drop_last=True,
                # Own generator: creating an iterator must not consume the global RNG, or a
                # resumed run would draw different RPN samples than an uninterrupted one.
                generator=torch.Generator().manual_seed(self.spec.runtime.seed),
            )
            for images, targets in loader:
                self.batches_done += 1
                yield images, targets
            self.epoch += 1
            self.batches_done = 0

    # ---- checkpoint state ---------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = gather_objects(capture_rng_state(), self.ctx)
        return {
            "model": self.student.state_dict(),
            "distiller": self.module.distiller.state_dict() if self.module.distiller else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "rng": rng,
            "world_size": self.ctx.world_size,
            "best": dict(self.best),
            "spec": self.spec.model_dump(mode="json"),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        if self.module.distiller is not None:
            self.module.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.best = dict(state["best"])
        rng = state["rng"]
        restore_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else rng[0])

    # ---- the loop -----------------------------------------------------------------------
    def step(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """One update; returns the loss terms as detached device tensors, read by the host
        only when they are reported (a read per term per step would stall a GPU each time)."""
        dev = self.ctx.device
        images = [i.as_subclass(Tensor).to(dev, non_blocking=True) for i in images]
        targets = [
            {"boxes": t["boxes"].as_subclass(Tensor).to(dev), "labels": t["labels"].to(dev)}
            for t in targets
        ]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        self.module.detach_student = self.iteration < self.spec.distill.align_iters
        with autocast:
            losses = self.model(images, targets)
        ramp = distill_ramp(self.iteration, self.spec.distill.warmup_iters)
        if ramp < 1.0:
            losses = {k: v * ramp if k.startswith("distill.") else v for k, v in losses.items()}
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        # Checked once the backward is queued, so the device is not left idle while the host
        # waits for the answer; still before any weight is touched.
        self._check_finite(losses)
        if self.spec.schedule.clip_grad_norm:
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, self.spec.schedule.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {k: v.detach() for k, v in losses.items()}

    def _check_finite(self, losses: dict[str, Tensor]) -> None:
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
        # one host read for every term (and one more under DDP, for the shared answer)
        if not any_true(not bool(finite.all()), self.ctx):
            return
        bad = [k for k, ok in zip(losses, finite.tolist(), strict=True) if not ok]
        names = sorted({k for part in gather_objects(bad, self.ctx) for k in part})
        raise NonFiniteLossError(
            f"loss {', '.join(names)} became non-finite at iteration {self.iteration + 1}; the "
            "last good checkpoint is kept. Lower schedule.lr, raise warmup_iters or set "
            "schedule.clip_grad_norm, then resume or restart."
        )

    def run(self, *, resume_from: Path | None = None) -> str:
        """Train to the end or to a requested stop, from `resume_from` when given; returns
        `succeeded` or `stopped`."""
        try:
            return self._run(resume_from)
        finally:  # `on_end` reaches only the launcher's reporter (another process under DDP)
            self.tensorboard.close()

    def _run(self, latest: Path | None) -> str:
        if latest is not None:
            from hmkd_core.engine.checkpoint import load_checkpoint

            self.restore(load_checkpoint(latest, map_location=self.ctx.device))
        total = self.spec.schedule.iterations
        main = self.ctx.is_main
        if main:
            # a save this run directory's last process was killed in the middle of
            for orphan in remove_orphans(self.out_dir):
                log.info("removed %s, left by an interrupted save", orphan)
            self._trim_metrics()
            self.reporter.on_start(
                total=total, start_iteration=self.iteration, out_dir=self.out_dir
            )
        self.model.train()
        batches = self._batches()
        window_t, window_n = time.perf_counter(), 0
        imgs_per_it = self.spec.schedule.batch_size * self.ctx.world_size
        while self.iteration < total:
            images, targets = next(batches)
            losses = self.step(images, targets)
            self.iteration += 1
            window_n += 1
            if self.iteration % self.spec.runtime.log_every == 0 or self.iteration == total:
                dt = (time.perf_counter() - window_t) / window_n
                window_t, window_n = time.perf_counter(), 0
                if main:
                    self._report(losses, dt, imgs_per_it, total)
            every = self.spec.eval.every
            if every and self.iteration % every == 0 and self.iteration < total:
                self.evaluate()
            if self.iteration % self.spec.checkpoint.every == 0 and self.iteration < total:
                if not self._may_write():
                    return "stopped"
                self.save_checkpoint()
            if any_true(main and self.reporter.should_stop(), self.ctx):
                if any_true(main and self.reporter.checkpoint_on_stop(), self.ctx):
                    self.save_checkpoint()
                return "stopped"
        if not self._may_write():
            return "stopped"
        self.finish()
        return "succeeded"

    def _may_write(self) -> bool:
        """Whether the run directory is still this run's to write (asked of the reporter on
        rank 0, the answer shared so every rank takes the same branch)."""
        return not any_true(self.ctx.is_main and not self.reporter.may_write(), self.ctx)

    def _report(self, terms: dict[str, Tensor], dt: float, imgs_per_it: int, total: int) -> None:
        values = torch.stack([v.float() for v in terms.values()]).tolist()  # one host read
        losses = dict(zip(terms, values, strict=True))
        lr = self.optimizer.param_groups[0]["lr"]
        progress = Progress(
            iteration=self.iteration,
            total=total,
            images_per_s=imgs_per_it / dt if dt > 0 else 0.0,
            eta_s=dt * (total - self.iteration),
            lr=lr,
            losses=losses,
        )
        self.reporter.on_progress(progress)
        self._append_metrics(
            {
                "iteration": self.iteration,
                "lr": lr,
                "images_per_s": progress.images_per_s,
                "loss": progress.loss,
                "losses": losses,
                "time": time.time(),
            }
        )

    # ---- collaborators ------------------------------------------------------------------
    def evaluate(self, *, predictions: bool = False) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        metrics = evaluate_detector(
            self.student,
            self.val_set,
            device=self.ctx.device,
            batch_size=self.spec.eval.batch_size,
            extra_area_ranges=evaluation_ranges(self.spec, self.val_set),
            ctx=self.ctx,
            predictions_path=self.out_dir / "predictions.json" if predictions else None,
        )
        if predictions and self.ctx.is_main:
            self.reporter.on_artifact("predictions", self.out_dir / "predictions.json")
        self.model.train()
        if metrics is None:  # not rank 0
            return None
        metrics["iteration"] = self.iteration
        self.last_eval = metrics
        self._append_metrics({"iteration": self.iteration, "eval": metrics, "time": time.time()})
        self.reporter.on_evaluation(self.iteration, metrics)
        value = metrics.get(self.spec.eval.metric)
        if value is None and self.spec.eval.metric not in metrics:
            raise KeyError(f"eval.metric {self.spec.eval.metric!r} is not among {sorted(metrics)}")
        if value is not None and (self.best["value"] is None or value > self.best["value"]):
            self.best = {
                "metric": self.spec.eval.metric,
                "value": value,
                "iteration": self.iteration,
            }
            path = self.checkpoints.save_named(
                {"model": self.student.state_dict(), "metrics": _jsonable(metrics)}, "best"
            )
            self.reporter.on_artifact("best", path)
        return metrics

    def save_checkpoint(self) -> None:
        state = self.state()  # every rank joins the RNG gather
        if self.ctx.is_main:
            path = self.checkpoints.save(state, self.iteration)
            self.reporter.on_artifact("checkpoint", path)

    def finish(self) -> None:
        metrics = self.evaluate(predictions=True)
        self.save_checkpoint()
        if not self.ctx.is_main:
            return
        metrics = dict(metrics or {})
        metrics["best"] = self.best
        header = StudentHeader(
            model=self.spec.student,
            num_classes=self.train_set.num_classes,
            categories=self.train_set.categories,
            label_to_category_id=self.train_set.label_to_category_id,
            metrics=_jsonable(metrics),
        )
        student = export_student(self.student, header, self.out_dir / "student.pt")
        self.reporter.on_artifact("student", student)
        if self.val_set is not None:
            write_eval_json(metrics, self.out_dir / "eval.json")
            self.reporter.on_artifact("eval", self.out_dir / "eval.json")
        self.reporter.on_artifact("metrics", self.out_dir / "metrics.jsonl")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def _trim_metrics(self) -> None:
        """Drop records past the resumed iteration: they belong to work being redone."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration
        ]
        path.write_text("".join(f"{line}\n" for line in keep))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj
