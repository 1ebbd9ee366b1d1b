"""``predict``: a pose model on images, folders and videos; COCO results JSON and pictures in OUT/.

Persons come from a person detector (``--detector``, :mod:`posequant.benchmarks.detect`: boxes on each
image and video frame), from ``--boxes`` (a COCO detection-results JSON: a list of ``{"image_id" or
"file_name", "bbox": [x, y, w, h], "score"}``), or each image (each video frame) is one person. A box
names its image by ``file_name`` (the image's file name, e.g. ``000000000139.jpg``) or by ``image_id``
(the number in the file name: COCO's ``000000000139.jpg`` is image 139). ``--boxes`` are for images; a
video's frames are each one person unless a detector finds them.

Preprocessing and decoding are evaluation's: ``--boxes`` are clipped as COCO's ground-truth boxes are
(:func:`clip_box`), detector boxes are taken as they are (as HRNet takes detection boxes); both grow by
the same padding (:func:`box_to_center_scale`), are cropped and normalised by :func:`crop_person` /
:func:`normalize` and decoded by the model's head (``posequant.core.decoding``, flip test included), on the
same runners.
The results JSON is :func:`coco_results`' (detector boxes: :func:`detection_results`', rescored and
OKS-NMS-ed as ``eval --detector``), which eval's COCO scorer reads back.

Photos are drawn and reported as a viewer shows them (turned by their EXIF orientation), except with
``--boxes``: box files are made on the stored pixels (as COCO's annotations are), so then images are
read as stored, as ``eval`` reads them.

Names and ids (docs/predict.md): each file is predicted once however often it is given (:func:`gather_inputs`);
its image_id is the number in its name, or -1, -2, ... when it has none of its own (:func:`image_ids`); its
picture's name is unique in OUT/ (:func:`output_names`). A run first removes an earlier run's files under its
own names and writes the results last, so OUT/ never holds results beside another run's pictures.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from posequant.calibration import (
    box_to_center_scale,
    clip_box,
    crop_person,
    exif_orientation,
    normalize,
    read_image,
    whole_image_center_scale,
)
from posequant.calibration.images import IMAGE_SUFFIXES
from posequant.core.args import Paths, checked
from posequant.core.batching import infer_at_batch
from posequant.core.decoding import head_of
from posequant.core.errors import DataError, PosequantError
from posequant.core.fileio import atomic_path, check_outputs, output_dir, write_bytes_atomic, write_text_atomic
from posequant.core.metadata import ModelMeta
from posequant.core.opened import ModelFile, open_model
from posequant.core.quiet import quiet
from posequant.core.quiet import warn as posequant_warn

from .detect import DEFAULT_IOU, PREDICT_SCORE, Box, Detector, open_detector, read_detections
from .drawing import FLOAT_BGR, INT8_BGR, draw_box, draw_skeleton, label, legend_band
from .metrics import coco_results, detection_results
from .runners import make_runner, resolve_backend

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
RESULTS_FILE = "keypoints.json"  # COCO keypoint results of MODEL
COMPARE_RESULTS_FILE = "keypoints.compare.json"  # ... of --compare's model
SUMMARY_FILE = "predict.json"
RUN_FILES = [SUMMARY_FILE, RESULTS_FILE, COMPARE_RESULTS_FILE]  # removed first and written last by every run
PROGRESS_MIN_UNITS = 10  # images or frames: below that a bar is noise
MODEL_SUFFIXES = (".onnx", ".xml", ".engine")  # an OpenVINO IR, a TensorRT engine: open_model and the runners open them


@dataclass
class PredictResult:
    model: str
    compare: str | None
    out_dir: str
    backend: str
    device: str
    flip: bool
    images: int = 0  # images predicted (not counting video frames)
    frames: int = 0  # video frames predicted
    people: int = 0  # persons predicted (MODEL's, after OKS-NMS with a detector)
    seconds: float = 0.0  # reading, detection, inference and decoding of every image and frame (not writing)
    detect_seconds: float = 0.0  # of which the detector's (letterbox, inference, decoding, NMS)
    pose_seconds: float = 0.0  # of which the pose model's (crops, inference, flip test, decoding), every model
    skipped: list[str] = field(default_factory=list)  # "path: why"
    image_ids: dict[str, Any] = field(default_factory=dict)  # input file -> the image_id in the results
    ids_not_in_names: list[str] = field(default_factory=list)  # images whose image_id is not the number in the name
    skipped_boxes: list[str] = field(default_factory=list)  # "path: bbox [...] on WxH: why" (--boxes)
    files: list[str] = field(default_factory=list)
    detector: dict[str, Any] | None = None  # the detector's file, layout, precision and thresholds
    boxes: int = 0  # person boxes found by the detector or read from --boxes (before OKS-NMS)

    def ms_per(self, seconds: float) -> float:
        units = self.images + self.frames
        return 1000 * seconds / units if units else 0.0

    @property
    def ms_per_unit(self) -> float:
        return self.ms_per(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "compare": self.compare, "out_dir": self.out_dir, "backend": self.backend,
                "device": self.device, "flip": self.flip, "images": self.images, "frames": self.frames,
                "people": self.people, "boxes": self.boxes, "detector": self.detector, "seconds": self.seconds,
                "ms_per_image_or_frame": self.ms_per_unit,
                "detector_ms_per_image_or_frame": self.ms_per(self.detect_seconds),
                "pose_ms_per_image_or_frame": self.ms_per(self.pose_seconds),
                "skipped": self.skipped, "skipped_boxes": self.skipped_boxes, "image_ids": self.image_ids,
                "ids_not_in_names": self.ids_not_in_names, "files": self.files}


# ---- inputs ------------------------------------------------------------------------------------

PICTURE, VIDEO_OUT, FRAMES = ".pose.jpg", ".pose.mp4", ".frames.jsonl"  # what OUT/ gets per image, per video


@dataclass
class Inputs:
    """What a run predicts: each file once, in the order given, and its picture's (or video's) name in OUT/."""

    files: list[Path]
    repeats: list[tuple[Path, Path]]  # (an input given again, the file it repeats): predicted once
    names: dict[Path, str]


def gather_inputs(paths: Sequence[str | os.PathLike]) -> Inputs:
    """The image and video files to predict, in the order given (a folder gives its images and videos, top level,
    sorted); a file given again (the same path, a symlink or hard link to it, or a folder and a file inside it)
    once, the first time; each with its output name (:func:`output_names`)."""
    if not paths:
        raise PosequantError("predict needs at least one IMAGE, FOLDER or VIDEO")
    found: list[Path] = []
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    for given in map(Path, paths):
        if given.is_dir():
            listed = sorted(p for p in given.iterdir() if p.is_file() and p.suffix.lower() in known
                            and not p.name.startswith("."))
            if not listed:
                raise DataError(f"{given} has no images or videos ({', '.join(known)}): point to another folder")
            found += listed
        elif given.is_file():
            if given.suffix.lower() not in known:
                raise DataError(f"{given} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a video "
                                f"({', '.join(VIDEO_SUFFIXES)}): rename or leave it out")
            found.append(given)
        else:
            raise DataError(f"input {given} does not exist: check the path")
    first: dict[tuple[int, int], Path] = {}
    files, repeats = [], []
    for p in found:
        st = p.stat()  # follows symlinks: a link and its target are one file
        seen = first.setdefault((st.st_dev, st.st_ino), p)
        if seen is p:
            files.append(p)
        else:
            repeats.append((p, seen))
    return Inputs(files, repeats, output_names(files))


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files :func:`gather_inputs` predicts: each once, in the order given."""
    return gather_inputs(paths).files


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each input's picture (or video) in OUT/: ``NAME.pose.jpg`` / ``NAME.pose.mp4``, NAME the file's stem.

    Inputs that would get one name (``cam1/frame.jpg`` and ``cam2/frame.jpg``; ``a.jpg`` and ``a.png``) are
    each named after their path from the deepest folder they share, ``/`` written ``_``, without the file type
    unless the file type is what tells them apart: ``cam1_frame.pose.jpg``, ``a.jpg.pose.jpg``. A name that
    still meets another input's is refused, naming both inputs (rename one)."""
    groups: dict[str, list[Path]] = {}
    for p in files:
        groups.setdefault(p.stem + (VIDEO_OUT if is_video(p) else PICTURE), []).append(p)
    names: dict[Path, str] = {}
    for name, group in groups.items():
        if len(group) == 1:
            names[group[0]] = name
            continue
        full = [os.path.abspath(p) for p in group]
        common = os.path.commonpath([os.path.dirname(f) for f in full])
        relative = [Path(os.path.relpath(f, common)) for f in full]
        labels = [str(r.with_suffix("")) for r in relative]
        if len(set(labels)) < len(labels):  # only the file type differs
            labels = [str(r) for r in relative]
        for p, label in zip(group, labels):
            names[p] = label.replace(os.sep, "_") + (VIDEO_OUT if is_video(p) else PICTURE)
    owner: dict[str, Path] = {}
    for p in files:
        other = owner.setdefault(names[p], p)
        if other is not p:
            raise DataError(f"inputs {other} and {p} would both be drawn to {names[p]} in the output folder: "
                            f"rename one of them, or predict them in separate runs")
    return {p: names[p] for p in files}  # in input order


def number_in_name(path: Path) -> int | None:
    """The number a file name carries (its stem's last run of digits): 000000000139.jpg -> 139."""
    runs = re.findall(r"\d+", path.stem)
    return int(runs[-1]) if runs else None


def numbered(images: Sequence[Path]) -> dict[int, list[Path]]:
    """The images whose names carry each number (:func:`number_in_name`); more than one: the number is shared."""
    out: dict[int, list[Path]] = {}
    for p in images:
        n = number_in_name(p)
        if n is not None:
            out.setdefault(n, []).append(p)
    return out


def image_ids(images: Sequence[Path]) -> dict[Path, int]:
    """The results' image_id of each image: the number in its name when no other input's name carries it; the
    others (no number, or one another input shares) get -1, -2, ... in input order. An image's id never depends
    on the numbered images beside it, and a negative id can meet no number in a name nor a dataset's image id
    (COCO's scorer refuses it rather than score it against another image)."""
    own = {ps[0]: n for n, ps in numbered(images).items() if len(ps) == 1}
    ids, unnumbered = {}, 0
    for p in images:
        if p in own:
            ids[p] = own[p]
        else:
            unnumbered -= 1
            ids[p] = unnumbered
    return ids


def ids_note(images: Sequence[Path], ids: dict[Path, int]) -> str | None:
    """The warning for a run whose images are numbered only in part (or share numbers), else None: which images
    got negative ids, and why."""
    others = [p for p in images if ids[p] < 0]
    shared = {p: n for n, ps in numbered(images).items() if len(ps) > 1 for p in ps}
    if not others or (len(others) == len(images) and not shared):  # all numbered, or none: nothing to explain
        return None
    why = [f"{p} ({f'shares {shared[p]}' if p in shared else 'no number'}: {ids[p]})" for p in others]
    return (f"{len(others)} of {len(images)} images have no number of their own in their names and get negative "
            f"image_ids: {_listed(why, ', ')}; the others keep the number in their names ({SUMMARY_FILE} maps "
            "each file to its id)")


def load_boxes(path: str | os.PathLike, images: Sequence[Path], *, min_score: float = 0.0) -> dict[Path, list[Box]]:
    """The boxes of each image from a COCO detection-results JSON; those scoring below ``min_score`` are dropped.

    ``file_name`` matches an image's file name; ``image_id`` the number in it (:func:`number_in_name`).
    A box naming no given image, or more than one, or a file that is not such a list, is refused in one line.
    """
    path = Path(path)
    by_name: dict[str, list[Path]] = {}
    for p in images:
        by_name.setdefault(p.name, []).append(p)
    by_number = numbered(images)
    boxes: dict[Path, list[Box]] = {p: [] for p in images}
    unknown: list[str] = []
    for d in read_detections(path, "--boxes"):
        if d.file_name is not None:
            matches, key = by_name.get(d.file_name, []), f"file_name {d.file_name!r}"
            hint = "rename one of them, or predict them in separate runs"
        else:
            try:
                matches = by_number.get(int(d.image_id), [])
            except (TypeError, ValueError):
                matches = []
            key = f"image_id {d.image_id!r}"
            hint = "name the image by file_name instead, or predict them in separate runs"
        if not matches:
            unknown.append(key)
            continue
        if len(matches) > 1:
            raise DataError(f"--boxes {path}: {key} matches {len(matches)} inputs ({', '.join(map(str, matches))}) "
                            f"and a box is on one image: {hint}")
        if d.box.score >= min_score:
            boxes[matches[0]].append(d.box)
    if unknown:
        raise DataError(f"--boxes {path} names {len(unknown)} images not among the inputs ({_listed(unknown, ', ')}"
                        "): file_name matches an image's file name, image_id the number in it; give those images, "
                        "or drop their boxes")
    return boxes


def box_problem(bbox: Sequence[float], width: int, height: int) -> str | None:
    """Why a ``--boxes`` box is no person on a ``width`` x ``height`` image: ``"empty"`` (w or h not above 0, or
    less than a pixel both ways once clipped as eval clips: nothing to crop), ``"outside"`` (no part of it on the
    image); None when it is one."""
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        return "empty"
    if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
        return "outside"
    clipped = clip_box(bbox, width, height)
    if clipped is None:  # on the image by less than a pixel
        return "outside"
    return "empty" if clipped[2] <= 0 and clipped[3] <= 0 else None


BOX_PROBLEMS = {
    "empty": "of zero or negative size, or under a pixel",
    "outside": "wholly outside their images",
}
BOX_HINTS = {
    "empty": "a box is [x, y, w, h] with w and h above 0, in the image's pixels",
    "outside": "boxes are in the stored image's pixels, x right and y down from its top-left corner",
}


# ---- one model on one picture -------------------------------------------------------------------


@dataclass
class Model:
    """A model ready to run: the opened file (format, metadata, head, fixed batch) and its runner."""

    file: ModelFile
    runner: Any

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def meta(self) -> ModelMeta:
        return self.file.meta

    @classmethod
    def open(cls, path: Path, backend: str | None, device: str, option: str = "MODEL") -> "Model":
        if path.suffix.lower() not in MODEL_SUFFIXES:
            raise PosequantError(f"{option} {path}: predict runs an exported model ({', '.join(MODEL_SUFFIXES)}); "
                                 "export a checkpoint first with `posequant export-pose`")
        if not path.is_file():
            raise PosequantError(f"{option} {path} not found: check the path")
        opened = open_model(path)
        return cls(opened, make_runner(backend, onnx_path=path, device=device, outputs=opened.outputs))

    def predict(self, image: np.ndarray, centers: np.ndarray, scales: np.ndarray, flip: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """Joints (K x J x 2, image pixels) and scores (K x J x 1) of the K persons of one BGR image."""
        crops = np.stack([crop_person(image, c, s, self.meta.input_size)[0] for c, s in zip(centers, scales)])
        x = normalize(crops, self.meta)
        head = head_of(self.meta)
        outputs = infer_at_batch(self.runner.run, x, self.file.batch)
        head.check(outputs, str(self.path))
        flipped = infer_at_batch(self.runner.run, np.ascontiguousarray(x[..., ::-1]), self.file.batch) if flip else None
        for out in (outputs, flipped):
            if out is not None and not all(np.isfinite(o).all() for o in out):
                raise PosequantError(f"{self.path} output NaN or inf values: the model is broken; re-export it")
        return head.decode(outputs, centers, scales, flipped)


def persons(image_shape: tuple[int, ...], boxes: list[Box] | None, input_size: tuple[int, int], *, clip: bool = True
            ) -> tuple[np.ndarray, np.ndarray, list[Box]]:
    """(centers, scales, boxes) of an image's persons: its boxes (clipped as eval clips COCO's ground-truth
    boxes, or with ``clip=False`` taken as given, as HRNet takes detection boxes), or the whole image as
    one box scoring 1. A box wholly outside the image (clipped to nothing) is no person."""
    height, width = image_shape[:2]
    if boxes is None:
        c, s = whole_image_center_scale((height, width), input_size)
        return c[None], s[None], [Box((0.0, 0.0, float(width), float(height)), 1.0)]
    centers, scales, used = [], [], []
    for b in boxes:
        box = clip_box(b.bbox, width, height) if clip else b.bbox
        if box is None:
            continue
        c, s = box_to_center_scale(box, input_size)
        centers.append(c)
        scales.append(s)
        used.append(b)
    if not centers:
        return np.zeros((0, 2)), np.zeros((0, 2)), []
    return np.stack(centers), np.stack(scales), used


@dataclass
class People:
    """One model's persons on one image or frame: joints (K x J x 2), scores (K x J x 1), their boxes and
    their COCO-shaped results (``box`` and ``box_score`` added)."""

    joints: np.ndarray
    scores: np.ndarray
    boxes: list[Box]
    results: list[dict]

    def __len__(self) -> int:
        return len(self.joints)


# ---- pictures ----------------------------------------------------------------------------------


def overlay(image: np.ndarray, meta: ModelMeta, joints: np.ndarray, scores: np.ndarray, color=FLOAT_BGR,
            text: str | None = None, boxes: Sequence[Box] = ()) -> np.ndarray:
    """``image`` with every person's skeleton (and box, with its score); each joint's dot coloured
    (red 0 -> green 1) and sized by its score."""
    img = image.copy()
    radius = max(3, int(round(max(img.shape[:2]) / 160)))
    for b in boxes:
        draw_box(img, b.bbox, color, f"{b.score:.2f}", thickness=max(1, radius // 2))
    for xy, s in zip(joints, scores):
        draw_skeleton(img, xy, meta.skeleton, color, scores=s, radius=radius)
    if text:
        label(img, text, color)
    return img


def side_by_side(image: np.ndarray, meta: ModelMeta, first: People, second: People, names: tuple[str, str],
                 boxes: bool = False) -> np.ndarray:
    """The gate's picture style: the first model (green) left, the second (orange) right, a legend on top."""
    left = overlay(image, meta, first.joints, first.scores, FLOAT_BGR, names[0], first.boxes if boxes else ())
    right = overlay(image, meta, second.joints, second.scores, INT8_BGR, names[1], second.boxes if boxes else ())
    gap = np.full((image.shape[0], 6, 3), 255, np.uint8)
    panels = np.hstack([left, gap, right])
    legend = legend_band(panels.shape[1], ((names[0], FLOAT_BGR, "line"), (names[1], INT8_BGR, "line")))
    return np.vstack([legend, panels])


# ---- the run -----------------------------------------------------------------------------------


def planned_files(inputs: Sequence[str | os.PathLike], compare=None) -> list[str]:
    """The names ``predict`` writes in OUT/ for these inputs (for checking every output before the run), the
    results first. ``keypoints.compare.json`` is among them with or without ``compare``: a run removes an earlier
    run's results under all of these names first (one without --compare must not leave an older comparison)."""
    return _planned(gather_inputs(inputs))


def frames_name(video_out: str) -> str:
    return video_out.removesuffix(VIDEO_OUT) + FRAMES


@checked(inputs=Paths("input"))
def predict(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike = "predict-out",
    *,
    boxes: str | os.PathLike | None = None,
    min_score: float = 0.0,
    detector: str | os.PathLike | None = None,
    det_score: float = PREDICT_SCORE,
    det_iou: float = DEFAULT_IOU,
    backend: str | None = None,
    device: str = "cpu",
    flip: bool = True,
    compare: str | os.PathLike | None = None,
    progress_bar: bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> PredictResult:
    """Run ``model`` (and ``compare``) on images, folders and videos; write results and pictures in ``out_dir``.

    Persons: a ``detector`` ONNX (YOLOX's layout, run on ``backend`` too; boxes scoring ``det_score`` or more,
    NMS at ``det_iou``; then HRNet's rescoring and OKS-NMS), ``boxes`` (a detection-results JSON), or each
    image is one person; boxes scoring below ``min_score`` are left out. OUT/ gets ``keypoints.json`` (COCO
    keypoint results with each person's ``box`` and ``box_score``, ``keypoints.compare.json`` for
    ``compare``), ``NAME.pose.jpg`` per image (boxes and skeletons; both models side by side with
    ``compare``), ``NAME.pose.mp4`` (same frame rate) and ``NAME.frames.jsonl`` (one line per frame) per
    video, and ``predict.json``. Unreadable images and videos are skipped, counted and named in one ``warn``
    line; when none is readable, :class:`DataError`; so are ``boxes`` that are no person on their image (one
    line per kind), inputs given twice and images without a number of their own among numbered ones.
    ``progress_bar``: None shows one on a terminal for 10+ images/frames.
    """
    say = warn or posequant_warn
    model, out = Path(model), Path(out_dir)
    given = gather_inputs(inputs)
    files, names = given.files, given.names
    planned = _planned(given)
    ins = {"MODEL": model, "--boxes": boxes, "--compare": compare, "--detector": detector}
    ins |= {f"input {p}": p for p in files}
    ins |= {f"INPUT {p}": p for p in inputs if p.is_dir()}  # nothing written into an input folder
    check_outputs({"-o/": (out, planned)}, ins)  # before any work
    for p in inputs:  # OUT/ inside an input folder: the next run would read its pictures back
        if p.is_dir() and os.path.commonpath([os.path.realpath(out), os.path.realpath(p)]) == os.path.realpath(p):
            raise PosequantError(f"-o {out} is inside the input folder {p}: choose an output folder outside it")
    if not 0.0 <= min_score or not np.isfinite(min_score):
        raise PosequantError(f"--min-score {min_score} must be a finite number >= 0")
    if boxes is not None and detector is not None:
        raise PosequantError("give --boxes (person boxes from a file) or --detector (a detector to run), not both")
    images = [p for p in files if not is_video(p)]
    ids = image_ids(images)
    box_map = load_boxes(boxes, images, min_score=min_score) if boxes is not None else None
    first = Model.open(model, backend, device)
    second = Model.open(Path(compare), backend, device, "--compare") if compare else None
    if second and second.meta.num_joints != first.meta.num_joints:
        raise PosequantError(f"--compare {compare} predicts {second.meta.num_joints} joints, {model} "
                             f"{first.meta.num_joints}: compare models of the same keypoint set")
    for m in (first, second):
        if m and flip and not m.meta.flip_pairs:
            raise PosequantError(f"{m.path} has no flip pairs ({m.meta.keypoints} keypoints): use --no-flip")
    backend = resolve_backend(model, backend)  # None: ort, or the one backend an IR / engine runs on
    found = open_detector(detector, backend=backend, device=device, score=det_score, iou=det_iou) if detector else None
    result = PredictResult(str(model), str(compare) if compare else None, str(out), backend, device, flip,
                           detector=found.settings() if found else None)
    result.ids_not_in_names = [str(p) for p in images if ids[p] < 0]
    if given.repeats:
        again = [f"{p} ({'again' if str(p) == str(kept) else f'the same file as {kept}'})" for p, kept in given.repeats]
        say(f"{_count(len(again), 'input')} given more than once {'is' if len(again) == 1 else 'are'} predicted "
            f"once: {_listed(again, ', ')}")
    note = ids_note(images, ids)
    if note:
        say(note)
    if box_map is not None:  # box files are made on the stored pixels: say which photos a viewer shows turned
        turned = [str(p) for p in images if exif_orientation(p) != 1]
        if turned:
            say(f"{len(turned)} images carry an EXIF orientation ({', '.join(turned[:3])}"
                f"{' and more' if len(turned) > 3 else ''}): --boxes are taken on the stored pixels, as COCO's "
                "annotations are, so they are drawn as stored, not turned as a viewer shows them")
    run = _Run(first, second, flip, result, out, found, min_score)
    with output_dir(out, "-o"):
        _remove(out, planned)  # an earlier run's files under this run's names: never mistaken for this run's
        bar = None
        try:
            bar = _bar(files, progress_bar)
            for path in files:
                if is_video(path):
                    run.video(path, names[path], bar)
                else:
                    run.image(path, ids[path], box_map[path] if box_map is not None else None, names[path])
                    bar.update(1)
            bar.close()
            if not result.images and not result.frames:
                raise DataError(f"none of the {len(files)} inputs could be read ({'; '.join(result.skipped[:3])}): "
                                "check the files")
            run.finish()  # the results and the summary last: with them, every picture is this run's
        except BaseException:  # an error, Ctrl-C, SIGTERM: none of this run's files stays, no results either
            if bar is not None:
                bar.close()
            _remove(out, [Path(f).name for f in result.files], strict=False)
            raise
    if result.skipped:
        say(f"skipped {len(result.skipped)} of {len(files)} inputs that cannot be read: {_listed(result.skipped)}")
    for why, items in run.bad_boxes.items():
        say(f"--boxes {boxes}: skipped {_count(len(items), 'box', 'boxes')} {BOX_PROBLEMS[why]} ({_listed(items)}): "
            f"{BOX_HINTS[why]}")
    return result


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _listed(items: Sequence[str], sep: str = "; ", shown: int = 3) -> str:
    """The first few items, then how many more: one line however many there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _planned(given: Inputs) -> list[str]:
    return RUN_FILES + [n for p, name in given.names.items()
                        for n in ((name, frames_name(name)) if is_video(p) else (name,))]


def _remove(out: Path, names: Sequence[str], *, strict: bool = True) -> None:
    """Remove these files of OUT/ (in this order; a symlink itself, not what it points to). ``strict``: one that
    cannot be removed (a folder of that name) is one line; otherwise it is left."""
    for name in names:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            if strict:
                raise PosequantError(f"-o {out}: cannot remove {name}, an earlier run's output under this run's "
                                     f"names ({e.strerror}): remove it, or choose another -o") from None


def _bar(files: Sequence[Path], shown: bool | None):
    from tqdm import tqdm

    total = sum(_frame_count(p) if is_video(p) else 1 for p in files)
    disable = (not shown) if shown is not None else (None if total >= PROGRESS_MIN_UNITS else True)
    # disable=None: tqdm's own rule, a bar only when stderr is a terminal
    return tqdm(total=total, unit="img", desc="predict", leave=False, file=sys.stderr, disable=disable)


def _frame_count(path: Path) -> int:
    cap = _open_video(path)
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if cap.isOpened() else 0
    finally:
        with quiet():
            cap.release()


# OpenCV's FFmpeg backend writes its complaints about a damaged file ("moov atom not found") to the process's
# stderr: kept there only with --verbose; the video is then one skipped input in our words.
UNREADABLE_VIDEO = ("not a readable video (OpenCV decodes no frame: damaged, truncated or an unsupported codec; "
                    "posequant --verbose shows FFmpeg's reason)")


def _open_video(path: Path):
    with quiet():
        return cv2.VideoCapture(str(path))


def _read_frame(cap) -> tuple[bool, np.ndarray | None]:
    with quiet():
        return cap.read()


class _Run:
    """The state of one predict run: the models, the detector, the results gathered so far, OUT/."""

    def __init__(self, first: Model, second: Model | None, flip: bool, result: PredictResult, out: Path,
                 detector: Detector | None = None, min_score: float = 0.0):
        self.first, self.second, self.flip, self.result, self.out = first, second, flip, result, out
        self.detector, self.min_score = detector, min_score
        self.results: list[dict] = []
        self.compare_results: list[dict] = []
        self.bad_boxes: dict[str, list[str]] = {}  # box_problem's reason -> "path [x, y, w, h] on WxH"

    def _people(self, image: np.ndarray, image_id: Any, boxes: list[Box] | None) -> list[People]:
        """Each model's persons on one picture, every model cropping at its own input size. With a detector,
        its boxes (found once for both models), then rescoring and OKS-NMS per model."""
        detected = self.detector is not None
        if detected:
            before = self.detector.seconds
            boxes = [b for b in self.detector.detect(image) if b.score >= self.min_score]
            self.result.detect_seconds += self.detector.seconds - before
        if boxes is not None:
            self.result.boxes += len(boxes)
        t0 = time.perf_counter()
        out = [self._model_people(m, image, image_id, boxes, detected) for m in (self.first, self.second) if m]
        self.result.pose_seconds += time.perf_counter() - t0
        return out

    def _model_people(self, m: Model, image: np.ndarray, image_id: Any, boxes: list[Box] | None,
                      detected: bool) -> People:
        centers, scales, used = persons(image.shape, boxes, m.meta.input_size, clip=not detected)
        j = m.meta.num_joints
        if not len(centers):
            return People(np.zeros((0, j, 2), np.float32), np.zeros((0, j, 1), np.float32), [], [])
        joints, scores = m.predict(image, centers, scales, self.flip)
        box_scores = [b.score for b in used]
        if not _coco_joints(joints):  # MPII's 16 joints have no OKS sigmas: no OKS-NMS
            results, kept = _plain_results(image_id, joints, scores, box_scores), list(range(len(joints)))
        elif detected:  # HRNet's detection-box path, as eval --detector scores it
            areas = [float(np.prod(s.astype(np.float32) * np.float32(200))) for s in scales]
            results, kept = detection_results([image_id] * len(joints), joints, scores, box_scores, areas)
        else:  # eval's own results and rescoring (ground-truth-like boxes: no OKS-NMS)
            results, kept = coco_results([image_id] * len(joints), joints, scores, box_scores), list(range(len(joints)))
        for r, k in zip(results, kept):
            r["box"], r["box_score"] = list(used[k].bbox), used[k].score
        return People(joints[kept], scores[kept], [used[k] for k in kept], results)

    def _picture(self, image: np.ndarray, people: list[People], boxes: bool) -> np.ndarray:
        if self.second is None:
            p = people[0]
            return overlay(image, self.first.meta, p.joints, p.scores, boxes=p.boxes if boxes else ())
        return side_by_side(image, self.first.meta, people[0], people[1],
                            (self.first.path.name, self.second.path.name), boxes)

    def _keep(self, people: list[People]) -> tuple[list[dict], list[dict]]:
        self.result.people += len(people[0])
        return people[0].results, (people[1].results if len(people) > 1 else [])

    def image(self, path: Path, image_id: Any, boxes: list[Box] | None, name: str) -> None:
        t0 = time.perf_counter()
        try:
            image = read_image(path, upright=boxes is None)  # box files name stored pixels, as COCO's
        except DataError as e:
            self.result.skipped.append(f"{path}: {_why(e)}")
            return
        if boxes is not None:
            boxes = self._usable(path, image.shape, boxes)
        people = self._people(image, image_id, boxes)
        self.result.seconds += time.perf_counter() - t0
        first, second = self._keep(people)
        self.results += first
        self.compare_results += second
        self.result.images += 1
        self.result.image_ids[str(path)] = image_id
        picture = self._picture(image, people, boxes is not None or self.detector is not None)
        ok, buf = cv2.imencode(".jpg", picture)
        if not ok:
            raise PosequantError(f"cannot encode the picture of {path}: OpenCV's JPEG encoder failed")
        self.result.files.append(str(write_bytes_atomic(self.out / name, buf.tobytes(), "-o")))

    def _usable(self, path: Path, shape: tuple[int, ...], boxes: list[Box]) -> list[Box]:
        """The ``--boxes`` of one image that are persons on it; the others are counted by reason (one warning each)."""
        height, width = shape[:2]
        kept = []
        for b in boxes:
            why = box_problem(b.bbox, width, height)
            if why is None:
                kept.append(b)
                continue
            shown = f"{path} [{', '.join(f'{v:g}' for v in b.bbox)}] on {width}x{height}"
            self.bad_boxes.setdefault(why, []).append(shown)
            self.result.skipped_boxes.append(f"{shown}: {BOX_PROBLEMS[why]}")
        return kept

    def video(self, path: Path, name: str, bar) -> None:
        cap = _open_video(path)
        try:
            ok, frame = _read_frame(cap) if cap.isOpened() else (False, None)
            if not ok:
                self.result.skipped.append(f"{path}: {UNREADABLE_VIDEO}")
                return
            fps = cap.get(cv2.CAP_PROP_FPS)
            fps = fps if np.isfinite(fps) and fps > 0 else 25.0  # a stream without a rate: the usual one
            target = self.out / name
            with atomic_path(target, "-o") as tmp, atomic_path(self.out / frames_name(name), "-o") as tmp_lines:
                # OpenCV picks the container by the file's suffix: write NAME.mp4 beside tmp, then move it
                video_tmp = tmp.with_name(tmp.name + ".mp4")
                try:
                    self._frames(cap, frame, fps, video_tmp, tmp_lines, bar)
                    os.replace(video_tmp, tmp)
                finally:
                    video_tmp.unlink(missing_ok=True)
            self.result.files += [str(target), str(self.out / frames_name(name))]
        finally:
            with quiet():
                cap.release()

    def _frames(self, cap, frame: np.ndarray, fps: float, video_path: Path, lines_path: Path, bar) -> None:
        writer = None
        try:
            with open(lines_path, "w", encoding="utf-8") as lines:
                index = 0
                while frame is not None:
                    t0 = time.perf_counter()
                    people = self._people(frame, index, None)
                    self.result.seconds += time.perf_counter() - t0
                    picture = self._picture(frame, people, self.detector is not None)
                    if writer is None:
                        h, w = picture.shape[:2]
                        with quiet():  # FFmpeg's own lines (container tags) only with --verbose
                            writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise PosequantError(f"cannot write {video_path.name}: OpenCV has no mp4v video encoder "
                                                 "here; install opencv-python (not -headless builds without it)")
                    writer.write(picture)
                    first, second = self._keep(people)
                    line = {"frame": index, "time_s": index / fps, "people": first}
                    if self.second is not None:
                        line["compare"] = second
                    lines.write(json.dumps(line) + "\n")
                    self.result.frames += 1
                    bar.update(1)
                    index += 1
                    t0 = time.perf_counter()  # decoding a frame counts, as reading an image does
                    ok, frame = _read_frame(cap)
                    self.result.seconds += time.perf_counter() - t0
                    frame = frame if ok else None
        finally:
            if writer is not None:
                with quiet():
                    writer.release()

    def finish(self) -> None:
        """The results, after every picture: the comparison's, MODEL's, then the summary (each atomically)."""
        out, r = self.out, self.result
        if self.second is not None:
            write_text_atomic(out / COMPARE_RESULTS_FILE, json.dumps(self.compare_results) + "\n", "-o")
            r.files.insert(0, str(out / COMPARE_RESULTS_FILE))
        write_text_atomic(out / RESULTS_FILE, json.dumps(self.results) + "\n", "-o")
        r.files.insert(0, str(out / RESULTS_FILE))
        r.files.append(str(out / SUMMARY_FILE))
        write_text_atomic(out / SUMMARY_FILE, json.dumps(r.to_dict(), indent=2) + "\n", "-o")


def _coco_joints(joints: np.ndarray) -> bool:
    return joints.shape[1] == 17  # coco_results checks for COCO's 17 keypoints


def _plain_results(image_id: Any, joints: np.ndarray, scores: np.ndarray, box_scores) -> list[dict]:
    """COCO-shaped results for a keypoint set other than COCO's (MPII's 16): same fields, the person score
    the mean joint score times the box's (as :func:`coco_results`, without its COCO-only checks)."""
    out = []
    for xy, s, b in zip(joints, scores, box_scores):
        s = np.asarray(s, np.float64).reshape(-1)
        out.append({"image_id": image_id, "category_id": 1,
                    "keypoints": np.concatenate([xy, s[:, None]], axis=1).reshape(-1).tolist(),
                    "score": float(s.mean()) * float(b)})
    return out


def _why(e: DataError) -> str:
    text = str(e)
    return "truncated" if "truncated" in text else "not a readable image"


def iter_frames_lines(path: str | os.PathLike) -> Iterator[dict]:
    """The per-frame JSON lines a video's ``NAME.frames.jsonl`` holds, one dict per frame."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def format_predict(result: PredictResult) -> str:
    units = [f"{result.images} images"] if result.images else []
    units += [f"{result.frames} video frames"] if result.frames else []
    unit = "image" if not result.frames else "image/frame"
    head = (f"predict: {', '.join(units)}, {result.people} people in {result.seconds:.2f} s "
            f"({result.ms_per_unit:.1f} ms per {unit}; "
            f"{result.backend} on {result.device}, flip {'on' if result.flip else 'off'})")
    lines = [head]
    if result.detector:
        d = result.detector
        detect_ms, pose_ms = result.ms_per(result.detect_seconds), result.ms_per(result.pose_seconds)
        lines.append(f"  detector {Path(d['detector']).name} ({d['layout']}, {d['precision']}, "
                     f"score >= {d['det_score']:g}, NMS IoU {d['det_iou']:g}): {result.boxes} boxes; per {unit}: "
                     f"detector {detect_ms:.1f} ms, pose {pose_ms:.1f} ms")
    if result.skipped:
        lines.append(f"  skipped {len(result.skipped)} unreadable inputs (see {SUMMARY_FILE})")
    lines.append(f"wrote {len(result.files)} files in {result.out_dir}: {RESULTS_FILE}"
                 + (f", {COMPARE_RESULTS_FILE}" if result.compare else "") + ", pictures, " + SUMMARY_FILE)
    return "\n".join(lines)
