"""The data stage and quantization.

Datasets (MPII, COCO, plain folders) and the test-time preprocessing every stage shares are
exported here; quantization is :func:`posequant.quantize` (``posequant.calibration.quantize``).
Module order, lowest first: ``images`` -> ``datasets`` -> ``preprocess`` -> ``reader`` ->
``quantize`` (with the graph passes ``deconv``, ``equalize``, ``qdq`` beside it).
"""

from .datasets import (
    FORMATS,
    PIXEL_STD,
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
from .preprocess import (
    Batch,
    BatchIterator,
    affine_transform,
    average_flip,
    crop_person,
    dataset_order,
    decode_heatmaps,
    flip_back,
    flip_shift,
    get_affine_transform,
    get_max_preds,
    heatmaps_to_joints,
    iter_batches,
    normalize,
    refine_quarter_pixel,
    shift_heatmaps,
    transform_preds,
)

__all__ = [
    "FORMATS",
    "PIXEL_STD",
    "Batch",
    "BatchIterator",
    "Person",
    "PoseDataset",
    "affine_transform",
    "average_flip",
    "box_people",
    "box_to_center_scale",
    "clip_box",
    "crop_person",
    "dataset_order",
    "exif_orientation",
    "decode_heatmaps",
    "default_workers",
    "flip_back",
    "flip_shift",
    "get_affine_transform",
    "get_max_preds",
    "heatmaps_to_joints",
    "iter_batches",
    "load_mpii_gt",
    "normalize",
    "open_dataset",
    "read_image",
    "image_problem",
    "skipped_image_warnings",
    "TruncatedImageError",
    "refine_quarter_pixel",
    "shift_heatmaps",
    "transform_preds",
    "whole_image_center_scale",
]
