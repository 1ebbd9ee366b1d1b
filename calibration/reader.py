"""Calibration data: seeded person crops, streamed with exactly the evaluation preprocessing.

``CalibrationCrops`` is re-iterable (NNCF walks the data more than once: statistics, then bias
correction) and decodes images on the fly, so only a few crops are in memory at any time.
``OrtCalibrationReader`` is the same data behind ONNX Runtime's ``CalibrationDataReader``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from posequant.core.errors import DataError
from posequant.core.metadata import ModelMeta
from posequant.core.quiet import warn as posequant_warn

from .datasets import Person, open_dataset
from .preprocess import iter_batches


@dataclass
class CalibrationCrops:
    people: list[Person]
    meta: ModelMeta
    input_name: str = "input"
    skipped_images: list[Path] = field(default_factory=list)
    skipped_people: int = 0
    batch: int = 1  # crops per feed: a fixed-batch model's own batch (the last feed repeats its last crop)

    def __len__(self) -> int:
        return len(self.people)

    def __iter__(self) -> Iterator[np.ndarray]:
        batches = iter_batches(self.people, self.meta, batch_size=self.batch, skip_bad=True)
        for batch in batches:
            x = batch.inputs
            if len(x) < self.batch:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch - len(x), 0)])
            yield x
        # first pass finds the bad images; later passes skip the same ones
        if not self.skipped_images and batches.skipped:
            self.skipped_images, self.skipped_people = list(batches.skipped), batches.skipped_people
        if self.skipped_people >= len(self.people):
            raise DataError(f"none of the {len(self.people)} calibration images could be decoded "
                            f"(e.g. {self.skipped_images[0]}): check the calibration folder")

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for x in self:
            yield {self.input_name: x}


class OrtCalibrationReader:
    """ONNX Runtime's CalibrationDataReader interface over :class:`CalibrationCrops`."""

    def __init__(self, crops: CalibrationCrops):
        self.crops = crops
        self._it = crops.feeds()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.crops.feeds()


@dataclass(frozen=True)
class CalibrationSet:
    crops: CalibrationCrops
    root: Path
    format: str
    split: str | None
    available: int  # people in the split before sampling
    seed: int
    unlisted: tuple[Path, ...] = ()  # images left out when the data was read: missing, or (folders) undecodable

    @property
    def skipped_images(self) -> list[Path]:
        """Every image calibration went without: left out when read, or failed to decode when cropped."""
        return list(dict.fromkeys([*self.unlisted, *self.crops.skipped_images]))

    def to_dict(self) -> dict:
        return {"root": str(self.root), "format": self.format, "split": self.split, "available_people": self.available,
                "people": len(self.crops), "seed": self.seed, "skipped_images": [str(p) for p in self.skipped_images],
                "skipped_people": self.crops.skipped_people}


def calibration_set(root: str | os.PathLike, meta: ModelMeta, *, num_samples: int = 300, seed: int = 0,
                    format: str | None = None, split: str | None = None, input_name: str = "input",
                    batch: int = 1, warn: Callable[[str], None] | None = None) -> CalibrationSet:
    """``num_samples`` people drawn with ``seed`` from the calibration split (MPII/COCO train first)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"calibration folder {root} does not exist: check --calib")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(f"calibration folder {root} is empty: point --calib at MPII, COCO or a folder of images")
    ds = open_dataset(root, input_size=meta.input_size, format=format, split=split, purpose="calib", skip_missing=True)
    if not ds.people:
        raise DataError(f"{root} has no people or images to calibrate on")
    if ds.keypoints is not None and ds.keypoints.num_joints != meta.num_joints:
        # calibration uses the crops, not the labels: another dataset's people calibrate as well (an MPII
        # model on COCO people), but a mismatch is often the wrong folder, so it is said
        (warn or posequant_warn)(f"the model predicts {meta.num_joints} joints but {root} is {ds.format.upper()} "
                                 f"with {ds.keypoints.num_joints}: calibrating on its people's crops (labels unused)")
    if ds.invalid_warning():  # degenerate ground truth: left out of calibration as of evaluation
        (warn or posequant_warn)(ds.invalid_warning())
    available = len(ds.people)
    if available < num_samples:
        (warn or posequant_warn)(f"{root} has {available} people, fewer than --num-samples {num_samples}: using all of them")
        chosen = list(ds.people)
    else:
        # sorted, so that people of one image stay together and each image is decoded once
        index = np.sort(np.random.default_rng(seed).choice(available, num_samples, replace=False))
        chosen = [ds.people[i] for i in index]
    crops = CalibrationCrops(chosen, meta, input_name, batch=batch)
    return CalibrationSet(crops, root, ds.format, ds.split, available, seed, tuple(ds.skipped))
