"""Detector builders and the exported-student format."""

from hmkd_core.models.builders import WeightsError, build_backbone, build_detector
from hmkd_core.models.export import StudentHeader, export_student, load_student

__all__ = [
    "StudentHeader",
    "WeightsError",
    "build_backbone",
    "build_detector",
    "export_student",
    "load_student",
]
