"""Test-time preprocessing, in one place for calibration, evaluation and benchmarks: person crops,
normalisation and batches (decoding the model's output is :mod:`posequant.core.decoding`).

Each step matches the official Simple Baselines / HRNet test code (``lib/utils/transforms.py``,
``JointsDataset.__getitem__``), so that an accuracy measured here is comparable with the published
numbers. Sizes: our ``input_size`` is (H, W) as in posequant's metadata; the official transforms
(:mod:`posequant.core.transforms`) take (W, H).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from posequant.core.errors import DataError, MetadataError
from posequant.core.metadata import ModelMeta
from posequant.core.opencv import cv2
from posequant.core.transforms import get_affine_transform

from .datasets import Person
from .images import default_workers, read_image

# ---- images and crops --------------------------------------------------------------------------


def crop_person(
    image_bgr: np.ndarray, center: Sequence[float], scale: Sequence[float], input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The model-input crop (H x W x 3 uint8) of one person, and the 2x3 image->crop matrix."""
    height, width = input_size
    trans = get_affine_transform(center, scale, 0, (width, height))
    crop = cv2.warpAffine(
        image_bgr, trans, (int(width), int(height)),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    return crop, trans


def normalize(crops_bgr: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """N x H x W x 3 uint8 BGR crops -> N x 3 x H x W float32 model input.

    Same arithmetic as torchvision's ToTensor + Normalize in the official code: float32
    ``x / 255``, then ``(x - mean) / std`` per channel in the model's colour order.
    """
    if meta.color not in ("rgb", "bgr"):
        raise MetadataError(f"model colour order {meta.color!r} is neither 'rgb' nor 'bgr': re-export the model")
    assert crops_bgr.ndim == 4 and crops_bgr.shape[-1] == 3, f"crops must be N x H x W x 3, got {crops_bgr.shape}"
    pixels = crops_bgr[..., ::-1] if meta.color == "rgb" else crops_bgr
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32, order="C")  # order="C": contiguous NCHW
    x /= np.float32(255)
    mean = np.asarray(meta.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x -= mean
    x /= std
    return x


# ---- batches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Model inputs for a run of people, with what decoding needs to map results back."""

    inputs: np.ndarray  # float32 N x 3 x H x W
    people: list[Person]
    centers: np.ndarray  # float64 N x 2
    scales: np.ndarray  # float64 N x 2
    inputs_flipped: np.ndarray | None = None  # inputs mirrored left-right (flip test), or None

    def __len__(self) -> int:
        return len(self.people)


def iter_batches(
    people: Iterable[Person],
    meta: ModelMeta,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    workers: int | None = None,
    flip: bool = False,
    skip_bad: bool = False,
) -> "BatchIterator":
    """Batches of preprocessed people (a ``PoseDataset`` or any list of ``Person``), in order.

    Decoding and warping run in ``workers`` threads, a few batches ahead of the consumer.
    An image that fails to decode raises DataError, or with ``skip_bad`` its people are left
    out and counted in the iterator's ``skipped`` (images) and ``skipped_people``.
    """
    chosen = list(itertools.islice(people, limit))
    return BatchIterator(chosen, meta, batch_size, workers or default_workers(), flip, skip_bad)


class BatchIterator(Iterator[Batch]):
    """The iterator ``iter_batches`` returns; ``skipped`` lists the images that failed to decode."""

    skipped: list[Path]  # unique, in order of discovery
    skipped_people: int

    def __init__(self, people: list[Person], meta: ModelMeta, batch_size: int, workers: int, flip: bool, skip_bad: bool):
        assert batch_size >= 1 and workers >= 1
        self.people = people
        self.meta = meta
        self.batch_size = batch_size
        self.workers = workers
        self.flip = flip
        self.skip_bad = skip_bad
        self.skipped = []
        self.skipped_people = 0
        self._batches = self._generate()

    def __next__(self) -> Batch:
        return next(self._batches)

    def __len__(self) -> int:
        """Number of batches (before any skipped images)."""
        return math.ceil(len(self.people) / self.batch_size)

    def close(self) -> None:
        self._batches.close()

    def _generate(self) -> Iterator[Batch]:
        chunks = [self.people[i:i + self.batch_size] for i in range(0, len(self.people), self.batch_size)]
        # Enough batches in flight to keep every worker busy, few enough to bound memory.
        ahead = max(2, math.ceil(4 * self.workers / self.batch_size))
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="posequant-crop") as pool:
            pending: deque[list[tuple[list[Person], Future]]] = deque()
            for chunk in chunks:
                pending.append(self._submit(pool, chunk))
                if len(pending) > ahead:
                    yield from self._collect(pending.popleft())
            while pending:
                yield from self._collect(pending.popleft())

    def _submit(self, pool: ThreadPoolExecutor, chunk: list[Person]) -> list[tuple[list[Person], Future]]:
        # One task per image: people of the same image (COCO) share one decode.
        runs = [list(run) for _, run in itertools.groupby(chunk, key=lambda p: p.image)]
        return [(run, pool.submit(_prepare_image, run, self.meta)) for run in runs]

    def _collect(self, tasks: list[tuple[list[Person], Future]]) -> Iterator[Batch]:
        people, inputs = [], []
        for run, future in tasks:
            try:
                inputs.append(future.result())
            except DataError:
                if not self.skip_bad:
                    raise
                self.skipped_people += len(run)
                if run[0].image not in self.skipped:  # a batch boundary may split an image's people
                    self.skipped.append(run[0].image)
                continue
            people.extend(run)
        if not people:
            return
        x = np.concatenate(inputs)
        flipped = np.ascontiguousarray(x[..., ::-1]) if self.flip else None
        centers = np.stack([p.center for p in people])
        scales = np.stack([p.scale for p in people])
        yield Batch(x, people, centers, scales, flipped)


def _prepare_image(people: list[Person], meta: ModelMeta) -> np.ndarray:
    """Decode one image, crop each of its people and normalise: K x 3 x H x W float32 (runs in a worker)."""
    image = read_image(people[0].image)
    crops = np.stack([crop_person(image, p.center, p.scale, meta.input_size)[0] for p in people])
    return normalize(crops, meta)
