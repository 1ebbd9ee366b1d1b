"""Test-time preprocessing and heatmap decoding, in one place for calibration, evaluation and benchmarks.

Each step matches the official Simple Baselines / HRNet test code (``lib/utils/transforms.py``,
``lib/core/inference.py``, ``JointsDataset.__getitem__``, ``function.validate``), so that an
accuracy measured here is comparable with the published numbers.

Sizes: our ``input_size`` / ``heatmap_size`` are (H, W) as in posequant's metadata; the
official transforms take (W, H), and their parameters here are named ``output_wh`` to say so.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from posequant.core.errors import DataError, MetadataError
from posequant.core.metadata import ModelMeta

from .datasets import PIXEL_STD, Person
from .images import default_workers, read_image

# ---- affine transforms (lib/utils/transforms.py) ------------------------------------------------


def get_affine_transform(
    center: Sequence[float],
    scale: Sequence[float] | float,
    rot: float,
    output_wh: Sequence[float],
    shift: Sequence[float] = (0.0, 0.0),
    inv: bool = False,
) -> np.ndarray:
    """2x3 matrix mapping the box (``center``, ``scale`` x 200 px) onto an output of ``output_wh`` = (W, H)."""
    if np.ndim(scale) == 0:
        scale = [scale, scale]
    center = np.asarray(center, dtype=np.float64)
    scale_px = np.asarray(scale, dtype=np.float64) * PIXEL_STD
    shift = np.asarray(shift, dtype=np.float32)
    dst_w, dst_h = output_wh[0], output_wh[1]

    rot_rad = np.pi * rot / 180
    src_dir = _rotate([0, scale_px[0] * -0.5], rot_rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_px * shift
    src[1, :] = center + src_dir + scale_px * shift
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    src[2:, :] = _third_point(src[0, :], src[1, :])
    dst[2:, :] = _third_point(dst[0, :], dst[1, :])

    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def _rotate(point: Sequence[float], rot_rad: float) -> list[float]:
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs]


def affine_transform(pt: Sequence[float], t: np.ndarray) -> np.ndarray:
    """Apply the 2x3 matrix ``t`` to one point."""
    return np.dot(t, np.array([pt[0], pt[1], 1.0]))[:2]


def transform_preds(
    coords: np.ndarray, center: Sequence[float], scale: Sequence[float], output_wh: Sequence[float]
) -> np.ndarray:
    """Map (J, 2) points from an ``output_wh`` crop (input or heatmap) back to image pixels (float64)."""
    t = get_affine_transform(center, scale, 0, output_wh, inv=True)
    x, y = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    # Written out (not a matmul) so the sums run in the same order as the official np.dot per point.
    return np.stack([t[0, 0] * x + t[0, 1] * y + t[0, 2], t[1, 0] * x + t[1, 1] * y + t[1, 2]], axis=1)


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


# ---- flip test (function.validate with FLIP_TEST and SHIFT_HEATMAP) ------------------------------


def flip_back(heatmaps: np.ndarray, flip_pairs: Iterable[Sequence[int]]) -> np.ndarray:
    """Heatmaps of a mirrored input, mirrored back with left/right joints swapped (a new array)."""
    assert heatmaps.ndim == 4, "heatmaps must be N x J x h x w"
    flipped = heatmaps[..., ::-1].copy()
    for a, b in flip_pairs:
        flipped[:, [a, b]] = flipped[:, [b, a]]
    return flipped


def shift_heatmaps(heatmaps: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Shift ``pixels`` right (official SHIFT_HEATMAP: one): flipped features are off; the left columns are kept."""
    shifted = heatmaps.copy()
    if pixels:
        shifted[..., pixels:] = heatmaps[..., :-pixels]
    return shifted


def flip_shift(input_width: int, heatmap_width: int) -> int:
    """Heatmap pixels the flipped-back heatmaps lag behind: (s - 1) / s at stride s, rounded.

    Mirroring an input of W pixels maps x to W - 1 - x, and mirroring a heatmap of w = W / s pixels maps
    u to w - 1 - u; with u = x / s the flipped-back peak sits (s - 1) / s heatmap pixels left of the
    true one. The official code shifts by one pixel, right for its stride 4 (0.75, rounded); at stride 1
    (full-resolution heatmaps) the right shift is none, and a shift of one would move every joint.
    """
    stride = input_width / heatmap_width
    return int(math.floor((stride - 1) / stride + 0.5))


def average_flip(
    heatmaps: np.ndarray, heatmaps_flipped: np.ndarray, flip_pairs: Iterable[Sequence[int]], *,
    shift: bool | int = True,
) -> np.ndarray:
    """Official flip test: mean of the heatmaps and the flipped-back (and shifted) flipped ones.

    ``shift``: True for the official one pixel, or the number of pixels (:func:`flip_shift`).
    """
    back = flip_back(heatmaps_flipped, flip_pairs)
    pixels = int(shift)
    if pixels:
        back = shift_heatmaps(back, pixels)
    return (heatmaps + back) * 0.5


def dataset_order(heatmaps: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The model's heatmap channels rearranged into the keypoint set's joint order (``meta.channel_joints``)."""
    if not meta.channel_joints:
        return heatmaps
    assert heatmaps.shape[1] == len(meta.channel_joints), "channel_joints must name every output channel"
    return heatmaps[:, np.argsort(meta.channel_joints)]


def heatmaps_to_joints(meta: ModelMeta, heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                       heatmaps_flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model output to joints in image pixels, in the dataset's joint order: the one place that
    reorders a model's channels, averages the flip test (its shift set by the model's real stride)
    and decodes. ``heatmaps_flipped``: the output for the mirrored inputs, or None (no flip test)."""
    heatmaps = dataset_order(heatmaps, meta)
    if heatmaps_flipped is not None:
        shift = flip_shift(meta.input_size[1], heatmaps.shape[3])
        heatmaps = average_flip(heatmaps, dataset_order(heatmaps_flipped, meta), meta.flip_pairs, shift=shift)
    return decode_heatmaps(heatmaps, centers, scales)


# ---- decoding (lib/core/inference.py, POST_PROCESS on) --------------------------------------------


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per joint: the first maximum's (x, y) in heatmap pixels (float32, 0 where max <= 0) and its value."""
    assert heatmaps.ndim == 4, "heatmaps must be N x J x h x w"
    n, j, _, width = heatmaps.shape
    flat = heatmaps.reshape(n, j, -1)
    idx = np.argmax(flat, axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)
    coords = np.stack([idx % width, idx // width], axis=2).astype(np.float32)
    coords *= (maxvals > 0.0).astype(np.float32)
    return coords, maxvals


def refine_quarter_pixel(heatmaps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Move each peak a quarter pixel toward its higher neighbour (away from the borders), in place."""
    n, j, height, width = heatmaps.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inside = (px > 1) & (px < width - 1) & (py > 1) & (py < height - 1)
    b, k = np.nonzero(inside)
    x, y = px[b, k], py[b, k]
    dx = heatmaps[b, k, y, x + 1] - heatmaps[b, k, y, x - 1]
    dy = heatmaps[b, k, y + 1, x] - heatmaps[b, k, y - 1, x]
    coords[b, k] += np.stack([np.sign(dx), np.sign(dy)], axis=1) * 0.25
    return coords


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Official ``get_final_preds``: joints in image pixels (float32 N x J x 2) and scores (N x J x 1)."""
    heatmaps = np.asarray(heatmaps)
    coords, maxvals = get_max_preds(heatmaps)
    refine_quarter_pixel(heatmaps, coords)
    heatmap_wh = (heatmaps.shape[3], heatmaps.shape[2])
    preds = np.empty_like(coords)  # float32, as the official all_preds
    for i in range(coords.shape[0]):
        preds[i] = transform_preds(coords[i], centers[i], scales[i], heatmap_wh)
    return preds, maxvals
