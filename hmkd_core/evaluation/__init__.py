"""Evaluation: COCO box AP, with extra small-object area ranges and per-category AP."""

from hmkd_core.evaluation.coco_eval import (
    CocoEvaluator,
    EvaluationError,
    summarize_coco,
    write_eval_json,
)

__all__ = ["CocoEvaluator", "EvaluationError", "summarize_coco", "write_eval_json"]
