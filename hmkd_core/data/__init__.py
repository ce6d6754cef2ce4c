"""Data: COCO-format detection datasets, their transforms and loaders, and SmallDigits.

Everything a trainer or evaluator needs is importable from here; the submodules are the
implementation (`coco` reads and checks datasets, `transforms` builds the v2 pipeline, `loader`
batches, `synth_digits` writes the benchmark).
"""

from hmkd_core.data.coco import (
    CocoDetectionDataset,
    DatasetError,
    augmentation_seed,
    load_rgb_image,
    read_annotation_file,
)
from hmkd_core.data.loader import build_loader, collate_detection
from hmkd_core.data.synth_digits import make_small_digits, synth_digits_stats
from hmkd_core.data.transforms import MIN_BOX_SIDE, build_transforms

__all__ = [
    "MIN_BOX_SIDE",
    "CocoDetectionDataset",
    "DatasetError",
    "augmentation_seed",
    "build_loader",
    "build_transforms",
    "collate_detection",
    "load_rgb_image",
    "make_small_digits",
    "read_annotation_file",
    "synth_digits_stats",
]
