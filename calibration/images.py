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


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) from a JPEG or PNG header without decoding the pixels; None for other files or damaged headers.

    Used to check ground truth against the image (an MPII centre far outside it) without reading every image twice.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
            if head[:2] != b"\xff\xd8":
                return None
            f.seek(2)
            while True:  # JPEG: walk the segments to the first start-of-frame marker
                marker = f.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                if marker[1] in (0xD8, 0x01) or 0xD0 <= marker[1] <= 0xD7:
                    continue
                length = int.from_bytes(f.read(2), "big")
                if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    frame = f.read(5)
                    return int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
                if length < 2:
                    return None
                f.seek(length - 2, 1)
    except OSError:
        return None
