"""Reading images as the official test code does, and the worker count for decoding them.

The lowest module of the data stage: ``datasets`` (image sizes for folder sets) and
``preprocess`` (crops) both read images through :func:`read_image`.
"""

from __future__ import annotations

import os

import numpy as np

from posequant.core.errors import DataError
from posequant.core.opencv import cv2

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # as JointsDataset: EXIF rotation ignored
# What a photo viewer shows: OpenCV's decoder turns the pixels by the EXIF Orientation tag (all eight values)
VIEWER_FLAGS = cv2.IMREAD_COLOR


class TruncatedImageError(DataError):
    """An image file that ends early: decoders fill the rest with grey (and libjpeg says so on stderr)."""


def image_truncated(data: bytes) -> bool:
    """Whether encoded JPEG or PNG bytes end before the format's end marker (other formats: False)."""
    if data[:2] == b"\xff\xd8":
        # the end-of-image marker must follow the last scan's header; scan data never holds 0xFF 0xD9
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-256:]
    return False


def read_image(path: str | os.PathLike, *, upright: bool = False) -> np.ndarray:
    """The image at ``path`` as BGR uint8 H x W x 3, decoded as the official code does (``cv2.imread`` with
    ``IMREAD_IGNORE_ORIENTATION``: the stored pixels, in which datasets are annotated), or with ``upright``
    turned by its EXIF orientation as a photo viewer shows it (``predict`` on raw photos).

    A truncated JPEG or PNG raises :class:`TruncatedImageError` before it is decoded: libjpeg would
    decode it with a grey bottom (and print "Premature end of JPEG file" from a worker thread).
    """
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        data = None
    if data is not None and data.size and image_truncated(data.tobytes()):
        raise TruncatedImageError(f"image {path} is truncated (it ends before the image does): replace or remove it")
    image = cv2.imdecode(data, VIEWER_FLAGS if upright else IMREAD_FLAGS) if data is not None and data.size else None
    if image is None:
        raise DataError(f"cannot decode image {path}: the file is missing, truncated or not an image; replace or remove it")
    return image


def image_problem(path: str | os.PathLike) -> str:
    """Why an image cannot be used, in a word or two: "missing", "truncated" or "not decodable"."""
    try:
        read_image(path)
    except TruncatedImageError:
        return "truncated"
    except DataError:
        return "missing" if not os.path.isfile(path) else "not decodable"
    return "readable"


def skipped_image_warnings(paths, what: str = "image", limit: int = 5) -> list[str]:
    """One line per reason: "1 image truncated, skipped: a.jpg" (the first ``limit`` names)."""
    by_reason: dict[str, list[str]] = {}
    for p in dict.fromkeys(str(p) for p in paths):
        by_reason.setdefault(image_problem(p), []).append(p)
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        noun = what if len(names) == 1 else what + "s"
        lines.append(f"{len(names)} {noun} {reason}, skipped: {shown}")
    return lines


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


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF Orientation tag (1-8) of a JPEG's APP1 segment; 1 (as stored) when there is none or it is damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return 1
    if head[:2] != b"\xff\xd8":
        return 1
    at = 2
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker, length = head[at + 1], int.from_bytes(head[at + 2:at + 4], "big")
        if marker == 0xDA or length < 2:  # the image data: no EXIF before it
            return 1
        body = head[at + 4:at + 2 + length]
        if marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            return _tiff_orientation(body[6:])
        at += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order) if ifd + 2 <= len(tiff) else 0
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1
