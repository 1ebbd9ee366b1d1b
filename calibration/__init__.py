"""The data stage and quantization.

Datasets (MPII, COCO, plain folders) and the test-time preprocessing every stage shares are
exported here (decoding a model's output is ``posequant.core.decoding``); quantization is
:func:`posequant.quantize` (``posequant.calibration.quantize``).
Module order, lowest first: ``images`` -> ``datasets`` -> ``preprocess`` -> ``reader`` ->
``quantize`` (with the graph passes ``deconv``, ``equalize``, ``qdq`` beside it).
"""

from posequant.core.transforms import PIXEL_STD, affine_transform, get_affine_transform, transform_preds

from .datasets import (
    FORMATS,
    Person,
    PoseDataset,
    box_people,
    box_to_center_scale,
    clip_box,
    load_mpii_gt,
    open_dataset,
    whole_image_center_scale,
)
from .images import (
    TruncatedImageError,
    default_workers,
    exif_orientation,
    image_problem,
    read_image,
    skipped_image_warnings,
)
from .preprocess import Batch, BatchIterator, crop_person, iter_batches, normalize

__all__ = [
    "FORMATS",
    "PIXEL_STD",
    "Batch",
    "BatchIterator",
    "Person",
    "PoseDataset",
    "affine_transform",
    "box_people",
    "box_to_center_scale",
    "clip_box",
    "crop_person",
    "exif_orientation",
    "default_workers",
    "get_affine_transform",
    "iter_batches",
    "load_mpii_gt",
    "normalize",
    "open_dataset",
    "read_image",
    "image_problem",
    "skipped_image_warnings",
    "TruncatedImageError",
    "transform_preds",
    "whole_image_center_scale",
]
