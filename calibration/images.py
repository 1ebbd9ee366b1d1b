"""Reading images as the official test code does, and the worker count for decoding them.

The lowest module of the data stage: ``datasets`` (image sizes for folder sets) and
``preprocess`` (crops) both read images through :func:`read_image`.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from posequant.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # as JointsDataset: EXIF rotation ignored


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as BGR uint8 H x W x 3, decoded as the official code does."""
    image = cv2.imread(str(path), IMREAD_FLAGS)
    if image is None:
        raise DataError(f"cannot decode image {path}: the file is missing, truncated or not an image; replace or remove it")
    return image


def default_workers() -> int:
    """Threads for decoding and warping: cv2 releases the GIL, so one per core (at most 8)."""
    return max(1, min(8, os.cpu_count() or 1))
