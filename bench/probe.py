"""Look inside one distillation setup on a few training batches, without training.

What decides whether feature distillation helps or hurts is mostly a matter of scale: how
large the distillation gradient on the student's features is next to the detection gradient,
how peaked the focal attention is, how much of it lands on objects. `probe` measures these on
real batches of a spec's training data, with its real teacher and student weights; `diagnose`
prints them and `calibrate` sets each method's weight from the gradient ratio.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from hmkd_core.data import CocoDetectionDataset, collate_detection
from hmkd_core.distill import build_distiller, build_response
from hmkd_core.distill.base import DistillInputs, standardize
from hmkd_core.distill.hooks import FeatureRecorder
from hmkd_core.distill.masks import level_masks, spatial_attention
from hmkd_core.engine.module import FrozenTeacher, ResponseTerms
from hmkd_core.engine.optim import clip_groups
from hmkd_core.models import build_detector
from hmkd_core.spec import DEFAULT_LEVELS, FocalOptions, TrainSpec, teacher_input_scale


def focal_options(spec: TrainSpec) -> FocalOptions:
    """The focal options the method uses (its own for hmkd and fgd, the defaults otherwise)."""
    d = spec.distill
    return {"hmkd": d.hmkd.sdm, "fgd": d.fgd.focal}.get(d.method, FocalOptions())


def method_weight(spec: TrainSpec, term: str) -> float:
    """The factor a distiller applied to a loss term, so its raw value can be shown."""
    d = spec.distill
    if term.startswith("response"):  # beside the method, not scaled by distill.weight
        r = d.response
        return {"response_box": r.box_weight, "response_objectness": r.objectness_weight}.get(
            term, r.weight
        )
    base = {
        "hmkd": d.hmkd.w_hm if term.startswith("hm_") else d.hmkd.w_sdm,
        "fgd": d.fgd.weight * (d.fgd.global_weight if term.startswith("fgd_global_") else 1.0),
        "mgd": d.mgd.weight,
        "mimic": d.mimic.weight,
    }.get(d.method, 1.0)
    level = term.rpartition("_")[2]
    if d.method == "hmkd" and term.startswith("hm_"):
        base *= d.hmkd.hm.level_weights.get(level, 1.0)
    return base * d.weight * d.level_weights.get(level, 1.0)


def term_kind(name: str, levels: tuple[str, ...]) -> str:
    """A loss term's kind, its name without the level: `hm_p2` -> `hm`, `sdm_fg_p3` -> `sdm_fg`.
    A term named for no level is its own kind."""
    head, _, tail = name.removeprefix("loss_").rpartition("_")
    return head if head and tail in levels else name.removeprefix("loss_")


def _batches(spec: TrainSpec, count: int, batch_size: int) -> list[tuple[list, list]]:
    ds = CocoDetectionDataset(spec.data.train.images, spec.data.train.annotations, train=False)
    g = torch.Generator().manual_seed(spec.runtime.seed)
    order = torch.randperm(len(ds), generator=g).tolist()
    out = []
    for b in range(count):
        idx = order[(b * batch_size) % len(ds) :][:batch_size]
        if len(idx) < batch_size:
            break
        images, targets = collate_detection([ds[i] for i in idx])
        out.append(
            (
                [i.as_subclass(Tensor) for i in images],
                [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"]} for t in targets],
            )
        )
    return out


def probe(spec: TrainSpec, *, batches: int = 8, batch_size: int | None = None) -> dict[str, Any]:
    """Per level and per loss term, averaged over `batches` training batches.

    Returns `levels` (level -> teacher rms, attention effective cells and foreground mass,
    foreground share of cells, gradient norms and their ratio), `grad_ratio` (over all
    levels), `pull` (kind of term -> its own gradient's ratio to the detection's, computed as
    `grad_ratio` is, so a method with one kind has `pull == grad_ratio`; the response terms
    (`response`, `response_box`, `response_objectness`) are not in `grad_ratio` and are
    measured over every map the box head pools, against the detection's gradient on the same
    maps), `terms` (name ->
    weighted and raw value), `clip_fraction` (fraction of batches whose total gradient norm
    exceeds the spec's clip threshold), `clip_scale` (the factor the clip multiplies the
    student's gradient by, averaged) and `distiller_norm_share` (‖g_distiller‖ / ‖g‖ over
    the norm that clip reads, averaged). With one norm over both, a distiller with large
    gradients of its own shrinks the student's gradient whatever its pull on the features;
    under SGD that shrinks the step, while Adam's normalisation undoes a steady scale and
    leaves only its batch-to-batch changes.
    """
    if spec.teacher is None or spec.distill.method == "none":
        raise ValueError("probe needs a distill spec with a teacher and a method")
    torch.manual_seed(spec.runtime.seed)
    train = CocoDetectionDataset(spec.data.train.images, spec.data.train.annotations)
    n = train.num_classes
    student = build_detector(spec.student, n).train()
    teacher = FrozenTeacher(
        build_detector(spec.teacher, n), teacher_input_scale(spec.student, spec.teacher)
    )
    levels = tuple(spec.distill.levels or DEFAULT_LEVELS[spec.student.arch])
    distiller = build_distiller(
        spec.distill,
        levels=levels,
        student_channels=spec.student.fpn_channels,
        teacher_channels=teacher.out_channels,
    ).train()
    focal = focal_options(spec)
    params = [p for m in (student, distiller) for p in m.parameters() if p.requires_grad]
    # the group whose norm the clip reads for the student: its own when clipped apart
    student_group = clip_groups([student, distiller], spec.distill.clip_apart)[0]
    in_group = {id(q) for q in student_group}
    distiller_in_group = [q for q in distiller.parameters() if id(q) in in_group]  # [] if apart
    per_level: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    terms: dict[str, list[float]] = defaultdict(list)
    # term kind -> level -> its ‖∂L/∂S_l‖ per batch, averaged like the total's
    pulls: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    clipped = 0
    scales: list[float] = []  # the factor the clip multiplies the student's gradient by
    shares: list[float] = []  # ‖g_distiller‖ / ‖g‖ in the norm the clip reads
    rounds = _batches(spec, batches, batch_size or spec.schedule.batch_size)
    response = build_response(spec.distill)
    heads = ResponseTerms(student, response) if response is not None else None
    pool = list(student.roi_heads.box_roi_pool.featmap_names) if heads else []
    response_grads: dict[str, list[float]] = defaultdict(list)  # "det"/term -> per batch
    with FeatureRecorder(student) as rec:
        for images, targets in rounds:
            det = sum(student(images, targets).values())
            feats = rec.levels()
            batch = rec.images.tensors
            seen = teacher.view(images, batch)
            t_raw, t_feats = seen.raw, seen.levels
            boxes = [t["boxes"] for t in rec.targets]
            losses = distiller(DistillInputs(feats, t_feats, boxes, tuple(batch.shape[-2:])))
            kd = sum(losses.values())
            scored: dict[str, Tensor] = {}
            if heads is not None:
                answered = heads.losses(teacher, t_raw, rec.targets)
                scored = {k.removeprefix("loss_"): v for k, v in answered.items()}
                # they reach every map the box head pools (the RPN's too: its extra level is
                # pooled from the last), not only the distilled levels
                assert rec.features is not None
                pooled = [rec.features[key] for key in pool]
                for name, g in (("det", det), *scored.items()):
                    grads = torch.autograd.grad(g, pooled, retain_graph=True, allow_unused=True)
                    found = [x for x in grads if x is not None]
                    norm = torch.nn.utils.get_total_norm(found) if found else 0.0
                    response_grads[name].append(float(norm))
            s_list = [feats[lv] for lv in levels]
            g_det = torch.autograd.grad(det, s_list, retain_graph=True, allow_unused=True)
            g_kd = torch.autograd.grad(kd, s_list, retain_graph=True, allow_unused=True)
            kinds: dict[str, list[Tensor]] = defaultdict(list)
            for name, value in losses.items():
                kinds[term_kind(name, levels)].append(value)
            for kind, values in kinds.items():
                g = (  # one kind is the whole loss, whose gradient is at hand
                    g_kd
                    if len(kinds) == 1
                    else torch.autograd.grad(
                        sum(values), s_list, retain_graph=True, allow_unused=True
                    )
                )
                for lv, x in zip(levels, g, strict=True):
                    pulls[kind][lv].append(0.0 if x is None else float(x.norm()))
            masks = level_masks(boxes, t_feats, levels)
            for lv, gd, gk in zip(levels, g_det, g_kd, strict=True):
                # the maps the distiller compares: standardized ones when the spec asks
                t = standardize(t_feats[lv]) if spec.distill.standardize else t_feats[lv]
                att = spatial_attention(t, focal.temperature, normalize=focal.normalize)
                p = att.flatten(1) / att.flatten(1).sum(dim=1, keepdim=True)  # (B, HW)
                fg = masks[lv][0].flatten(1)
                stats = per_level[lv]
                stats["teacher_rms"].append(float(t.pow(2).mean().sqrt()))
                stats["att_effective_cells"].append(float((1.0 / p.pow(2).sum(1)).mean()))
                stats["att_fg_mass"].append(float((p * fg).sum(1).mean()))
                stats["fg_cells"].append(float(fg.mean()))
                stats["grad_det"].append(0.0 if gd is None else float(gd.norm()))
                stats["grad_kd"].append(0.0 if gk is None else float(gk.norm()))
            for name, value in losses.items():
                terms[name.removeprefix("loss_")].append(float(value.detach()))
            for name, value in scored.items():
                terms[name].append(float(value.detach()))
            for prm in params:
                prm.grad = None
            (det + kd + sum(scored.values())).backward()
            grads = [q.grad for q in student_group if q.grad is not None]
            total = float(torch.nn.utils.get_total_norm(grads))
            clip = spec.schedule.clip_grad_norm
            clipped += int(clip is not None and total > clip)
            scales.append(min(1.0, clip / total) if clip is not None and total > 0 else 1.0)
            theirs = [q.grad for q in distiller_in_group if q.grad is not None]
            their_norm = float(torch.nn.utils.get_total_norm(theirs)) if theirs else 0.0
            shares.append(their_norm / total if total else 0.0)
            rec.reset()
    if heads is not None:
        heads.close()
    levels_out = {}
    for lv, stats in per_level.items():
        mean = {k: statistics.fmean(v) for k, v in stats.items()}
        mean["grad_ratio"] = mean["grad_kd"] / mean["grad_det"] if mean["grad_det"] else math.inf
        levels_out[lv] = mean
    total_det = math.sqrt(sum(v["grad_det"] ** 2 for v in levels_out.values()))
    total_kd = math.sqrt(sum(v["grad_kd"] ** 2 for v in levels_out.values()))
    terms_out = {}
    for name, values in terms.items():
        weighted = statistics.fmean(values)
        w = method_weight(spec, name)
        terms_out[name] = {"weighted": weighted, "raw": weighted / w if w else None}
    pull = {  # each kind's gradient next to the detection's, on the total's footing
        kind: math.sqrt(sum(statistics.fmean(v) ** 2 for v in by_level.values())) / total_det
        if total_det
        else math.inf
        for kind, by_level in sorted(pulls.items())
    }
    if response_grads["det"]:  # over the pooled maps, the detection's gradient on the same
        det_norm = statistics.fmean(response_grads.pop("det"))
        for name, norms in response_grads.items():
            pull[name] = statistics.fmean(norms) / det_norm
    return {
        "method": spec.distill.method,
        "levels": levels_out,
        "grad_ratio": total_kd / total_det if total_det else math.inf,
        "pull": pull,
        "terms": terms_out,
        "clip_fraction": clipped / max(1, len(rounds)),
        "clip_scale": statistics.fmean(scales) if scales else 1.0,
        "distiller_norm_share": statistics.fmean(shares) if shares else 0.0,
        "batches": len(rounds),
    }


def format_probe(name: str, result: dict[str, Any]) -> str:
    """A plain-text block: one line per level, then the loss terms."""
    lines = [
        f"{name}: ‖∂L_kd/∂S‖ / ‖∂L_det/∂S‖ = {result['grad_ratio']:.3f} over all levels; "
        f"gradient clipping fired on {100 * result['clip_fraction']:.0f} % of "
        f"{result['batches']} batches",
        f"  {'level':<6}{'T rms':>8}{'att cells':>11}{'att on fg':>11}{'fg cells':>10}"
        f"{'‖∂det‖':>10}{'‖∂kd‖':>10}{'ratio':>10}",
    ]
    for lv, s in result["levels"].items():
        lines.append(
            f"  {lv:<6}{s['teacher_rms']:>8.2f}{s['att_effective_cells']:>11.1f}"
            f"{s['att_fg_mass']:>11.3f}{s['fg_cells']:>10.3f}{s['grad_det']:>10.2e}"
            f"{s['grad_kd']:>10.2e}{s['grad_ratio']:>10.3g}"
        )
    lines.append(
        f"  clipping scales the student's gradient by {result['clip_scale']:.3g} on average; "
        f"‖g_distiller‖ / ‖g‖ in the norm it reads: {result['distiller_norm_share']:.3g}"
    )
    if len(result.get("pull", {})) > 1:  # one kind is the total already printed
        parts = ", ".join(f"{k} {v:.3g}" for k, v in result["pull"].items())
        lines.append(f"  ‖∂L_term/∂S‖ / ‖∂L_det/∂S‖ by kind of term: {parts}")
    for term, v in sorted(result["terms"].items()):
        raw = "–" if v["raw"] is None else f"{v['raw']:.3e}"
        lines.append(f"  term {term:<22} weighted {v['weighted']:.3e}   raw {raw}")
    return "\n".join(lines)
