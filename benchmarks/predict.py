"""``predict``: a pose model on images, folders and videos; COCO results JSON and pictures in OUT/.

Persons come from ``--boxes`` (a COCO detection-results JSON: a list of ``{"image_id" or "file_name",
"bbox": [x, y, w, h], "score"}``), or each image (each video frame) is one person. A box names its
image by ``file_name`` (the image's file name, e.g. ``000000000139.jpg``) or by ``image_id`` (the number
in the file name: COCO's ``000000000139.jpg`` is image 139). Boxes are for images; a video's frames are
each one person.

Preprocessing and decoding are evaluation's: boxes are clipped as COCO annotations are
(:func:`clip_box`), grown by the same padding (:func:`box_to_center_scale`), cropped and normalised by
:func:`crop_person` / :func:`normalize` and decoded by :func:`heatmaps_to_joints` (flip test included),
on the same runners; the results JSON is :func:`coco_results`', which eval's COCO scorer reads back.
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
    heatmaps_to_joints,
    normalize,
    read_image,
    whole_image_center_scale,
)
from posequant.calibration.images import IMAGE_SUFFIXES
from posequant.core.batching import infer_at_batch
from posequant.core.errors import DataError, PosequantError
from posequant.core.fileio import atomic_path, check_outputs, output_dir, write_bytes_atomic, write_text_atomic
from posequant.core.metadata import ModelMeta, read_meta
from posequant.core.onnxfile import check_heatmaps
from posequant.core.quiet import warn as posequant_warn

from .drawing import FLOAT_BGR, INT8_BGR, draw_skeleton, label, legend_band
from .metrics import coco_results
from .runners import make_runner, resolve_backend

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
RESULTS_FILE = "keypoints.json"  # COCO keypoint results of MODEL
COMPARE_RESULTS_FILE = "keypoints.compare.json"  # ... of --compare's model
SUMMARY_FILE = "predict.json"
PROGRESS_MIN_UNITS = 10  # images or frames: below that a bar is noise
MODEL_SUFFIXES = (".onnx", ".xml", ".engine")  # an OpenVINO IR, a TensorRT engine: read_meta and the runners open them


@dataclass
class Box:
    """One detection: [x, y, w, h] in image pixels and its score (1 when the file gives none)."""

    bbox: tuple[float, float, float, float]
    score: float


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
    people: int = 0  # persons predicted (MODEL's; --compare's are the same persons)
    seconds: float = 0.0  # reading, inference and decoding of every image and frame (not writing)
    skipped: list[str] = field(default_factory=list)  # "path: why"
    image_ids: dict[str, Any] = field(default_factory=dict)  # input file -> the image_id in the results
    files: list[str] = field(default_factory=list)

    @property
    def ms_per_unit(self) -> float:
        units = self.images + self.frames
        return 1000 * self.seconds / units if units else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "compare": self.compare, "out_dir": self.out_dir, "backend": self.backend,
                "device": self.device, "flip": self.flip, "images": self.images, "frames": self.frames,
                "people": self.people, "seconds": self.seconds, "ms_per_image_or_frame": self.ms_per_unit,
                "skipped": self.skipped, "image_ids": self.image_ids, "files": self.files}


# ---- inputs ------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image and video files, in the order given; a folder gives its images and videos (top level, sorted)."""
    if not paths:
        raise PosequantError("predict needs at least one IMAGE, FOLDER or VIDEO")
    out: list[Path] = []
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and p.suffix.lower() in known
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{given} has no images or videos ({', '.join(known)}): point to another folder")
            out += found
        elif given.is_file():
            if given.suffix.lower() not in known:
                raise DataError(f"{given} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a video "
                                f"({', '.join(VIDEO_SUFFIXES)}): rename or leave it out")
            out.append(given)
        else:
            raise DataError(f"input {given} does not exist: check the path")
    return out


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def number_in_name(path: Path) -> int | None:
    """The number a file name carries (its stem's last run of digits): 000000000139.jpg -> 139."""
    runs = re.findall(r"\d+", path.stem)
    return int(runs[-1]) if runs else None


def image_ids(images: Sequence[Path]) -> dict[Path, Any]:
    """The results' image_id of each image: the number in its name, else its position (1-based) in the inputs."""
    numbers = [number_in_name(p) for p in images]
    if None in numbers or len(set(numbers)) < len(numbers):  # ids must tell images apart
        return {p: i + 1 for i, p in enumerate(images)}
    return dict(zip(images, numbers))


def load_boxes(path: str | os.PathLike, images: Sequence[Path], *, min_score: float = 0.0) -> dict[Path, list[Box]]:
    """The boxes of each image from a COCO detection-results JSON; those scoring below ``min_score`` are dropped.

    ``file_name`` matches an image's file name; ``image_id`` the number in it (:func:`number_in_name`).
    A box naming no given image, or a file that is not such a list, is refused in one line.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--boxes {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--boxes {path} is not readable JSON ({e}): give COCO detection results "
                        '[{"image_id" or "file_name", "bbox": [x, y, w, h], "score"}, ...]') from None
    if not isinstance(entries, list):
        raise DataError(f"--boxes {path} holds a JSON {type(entries).__name__}, not a list of detections: "
                        'give COCO detection results [{"image_id" or "file_name", "bbox": [x, y, w, h], "score"}, ...]')
    by_name = {p.name: p for p in images}
    by_number: dict[int, Path] = {}
    for p in images:
        n = number_in_name(p)
        if n is not None:
            by_number.setdefault(n, p)
    boxes: dict[Path, list[Box]] = {p: [] for p in images}
    unknown: list[str] = []
    for i, e in enumerate(entries):
        where = f"--boxes {path} (entry {i})"
        if not isinstance(e, dict):
            raise DataError(f"{where} is not an object: each detection is {{\"image_id\", \"bbox\", \"score\"}}")
        bbox = e.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bbox)):
            raise DataError(f"{where}: bbox {bbox!r} is not [x, y, w, h] (4 finite numbers): fix the file")
        score = e.get("score", 1.0)
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not np.isfinite(score):
            raise DataError(f"{where}: score {score!r} is not a finite number: fix the file")
        if "file_name" in e:
            image = by_name.get(Path(str(e["file_name"])).name)
            key = f"file_name {e['file_name']!r}"
        elif "image_id" in e:
            try:
                image = by_number.get(int(e["image_id"]))
            except (TypeError, ValueError):
                image = None
            key = f"image_id {e['image_id']!r}"
        else:
            raise DataError(f"{where} has neither image_id nor file_name: say which image each box is on")
        if image is None:
            unknown.append(key)
            continue
        if score >= min_score:
            boxes[image].append(Box(tuple(float(v) for v in bbox), float(score)))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise DataError(f"--boxes {path} names {len(unknown)} images not among the inputs ({shown}): file_name "
                        "matches an image's file name, image_id the number in it; give those images, or "
                        "drop their boxes")
    return boxes


# ---- one model on one picture -------------------------------------------------------------------


@dataclass
class Model:
    """A model ready to run: its file, metadata, runner and fixed batch (None: dynamic)."""

    path: Path
    meta: ModelMeta
    runner: Any
    fixed: int | None

    @classmethod
    def open(cls, path: Path, backend: str | None, device: str, option: str = "MODEL") -> "Model":
        if path.suffix.lower() not in MODEL_SUFFIXES:
            raise PosequantError(f"{option} {path}: predict runs an exported model ({', '.join(MODEL_SUFFIXES)}); "
                                 "export a checkpoint first with `posequant export-pose`")
        if not path.is_file():
            raise PosequantError(f"{option} {path} not found: check the path")
        meta = read_meta(path)
        runner = make_runner(backend, onnx_path=path, device=device)
        fixed = None
        if path.suffix.lower() == ".onnx":
            from .evaluate import onnx_fixed_batch

            fixed = onnx_fixed_batch(path)
        return cls(path, meta, runner, fixed)

    def predict(self, image: np.ndarray, centers: np.ndarray, scales: np.ndarray, flip: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """Joints (K x J x 2, image pixels) and scores (K x J x 1) of the K persons of one BGR image."""
        crops = np.stack([crop_person(image, c, s, self.meta.input_size)[0] for c, s in zip(centers, scales)])
        x = normalize(crops, self.meta)
        heatmaps = infer_at_batch(self.runner.infer, x, self.fixed)
        check_heatmaps(heatmaps, self.meta, str(self.path))
        flipped = infer_at_batch(self.runner.infer, np.ascontiguousarray(x[..., ::-1]), self.fixed) if flip else None
        for h in (heatmaps, flipped):
            if h is not None and not np.isfinite(h).all():
                raise PosequantError(f"{self.path} output NaN or inf heatmaps: the model is broken; re-export it")
        return heatmaps_to_joints(self.meta, heatmaps, centers, scales, flipped)


def persons(image_shape: tuple[int, ...], boxes: list[Box] | None, input_size: tuple[int, int]
            ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(centers, scales, box scores) of an image's persons: its boxes, clipped as eval clips COCO's, or the whole image."""
    height, width = image_shape[:2]
    if boxes is None:
        c, s = whole_image_center_scale((height, width), input_size)
        return c[None], s[None], [1.0]
    centers, scales, scores = [], [], []
    for b in boxes:
        clipped = clip_box(b.bbox, width, height)
        if clipped is None:  # a box wholly outside the image: no person to crop
            continue
        c, s = box_to_center_scale(clipped, input_size)
        centers.append(c)
        scales.append(s)
        scores.append(b.score)
    if not centers:
        return np.zeros((0, 2)), np.zeros((0, 2)), []
    return np.stack(centers), np.stack(scales), scores


# ---- pictures ----------------------------------------------------------------------------------


def overlay(image: np.ndarray, meta: ModelMeta, joints: np.ndarray, scores: np.ndarray, color=FLOAT_BGR,
            text: str | None = None) -> np.ndarray:
    """``image`` with every person's skeleton; each joint's dot coloured (red 0 -> green 1) and sized by its score."""
    img = image.copy()
    radius = max(3, int(round(max(img.shape[:2]) / 160)))
    for xy, s in zip(joints, scores):
        draw_skeleton(img, xy, meta.skeleton, color, scores=s, radius=radius)
    if text:
        label(img, text, color)
    return img


def side_by_side(image: np.ndarray, meta: ModelMeta, first, second, names: tuple[str, str]) -> np.ndarray:
    """The gate's picture style: the first model (green) left, the second (orange) right, a legend on top."""
    left = overlay(image, meta, *first, FLOAT_BGR, names[0])
    right = overlay(image, meta, *second, INT8_BGR, names[1])
    gap = np.full((image.shape[0], 6, 3), 255, np.uint8)
    panels = np.hstack([left, gap, right])
    legend = legend_band(panels.shape[1], ((names[0], FLOAT_BGR, "line"), (names[1], INT8_BGR, "line")))
    return np.vstack([legend, panels])


# ---- the run -----------------------------------------------------------------------------------


def output_names(inputs: Sequence[Path]) -> dict[Path, str]:
    """Each input's picture (or video) in OUT/: NAME.pose.jpg / NAME.pose.mp4, numbered when names repeat."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for i, p in enumerate(inputs):
        suffix = ".pose.mp4" if is_video(p) else ".pose.jpg"
        name = p.stem + suffix
        if name in used:
            name = f"{p.stem}.{i}{suffix}"
        used.add(name)
        names[p] = name
    return names


def planned_files(inputs: Sequence[str | os.PathLike], compare=None) -> list[str]:
    """The names ``predict`` writes in OUT/ for these inputs (for checking every output before the run)."""
    names = output_names(expand_inputs(inputs))
    planned = [RESULTS_FILE, SUMMARY_FILE] + ([COMPARE_RESULTS_FILE] if compare else [])
    return planned + [n for p, name in names.items() for n in ((name, frames_name(name)) if is_video(p) else (name,))]


def frames_name(video_out: str) -> str:
    return video_out.replace(".pose.mp4", ".frames.jsonl")


def predict(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike = "predict-out",
    *,
    boxes: str | os.PathLike | None = None,
    min_score: float = 0.0,
    backend: str | None = None,
    device: str = "cpu",
    flip: bool = True,
    compare: str | os.PathLike | None = None,
    progress_bar: bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> PredictResult:
    """Run ``model`` (and ``compare``) on images, folders and videos; write results and pictures in ``out_dir``.

    OUT/ gets ``keypoints.json`` (COCO keypoint results, ``keypoints.compare.json`` for ``compare``),
    ``NAME.pose.jpg`` per image (both models side by side with ``compare``), ``NAME.pose.mp4`` (same
    frame rate) and ``NAME.frames.jsonl`` (one line per frame) per video, and ``predict.json``.
    Unreadable images and videos are skipped, counted and named in one ``warn`` line; when none is
    readable, :class:`DataError`. ``progress_bar``: None shows one on a terminal for 10+ images/frames.
    """
    say = warn or posequant_warn
    model, out = Path(model), Path(out_dir)
    files = expand_inputs(inputs)
    names = output_names(files)
    planned = planned_files(inputs, compare)
    ins = {"MODEL": model, "--boxes": boxes, "--compare": compare} | {f"input {p}": p for p in files}
    ins |= {f"INPUT {p}": p for p in map(Path, inputs) if Path(p).is_dir()}  # nothing written into an input folder
    check_outputs({"-o/": (out, planned)}, ins)  # before any work
    for p in map(Path, inputs):  # OUT/ inside an input folder: the next run would read its pictures back
        if p.is_dir() and os.path.commonpath([os.path.realpath(out), os.path.realpath(p)]) == os.path.realpath(p):
            raise PosequantError(f"-o {out} is inside the input folder {p}: choose an output folder outside it")
    if not 0.0 <= min_score or not np.isfinite(min_score):
        raise PosequantError(f"--min-score {min_score} must be a finite number >= 0")
    first = Model.open(model, backend, device)
    second = Model.open(Path(compare), backend, device, "--compare") if compare else None
    if second and second.meta.num_joints != first.meta.num_joints:
        raise PosequantError(f"--compare {compare} predicts {second.meta.num_joints} joints, {model} "
                             f"{first.meta.num_joints}: compare models of the same keypoint set")
    for m in (first, second):
        if m and flip and not m.meta.flip_pairs:
            raise PosequantError(f"{m.path} has no flip pairs ({m.meta.keypoints} keypoints): use --no-flip")
    images = [p for p in files if not is_video(p)]
    ids = image_ids(images)
    box_map = load_boxes(boxes, images, min_score=min_score) if boxes is not None else None
    backend = resolve_backend(model, backend)  # None: ort, or the one backend an IR / engine runs on
    result = PredictResult(str(model), str(compare) if compare else None, str(out), backend, device, flip)
    run = _Run(first, second, flip, result, out)
    with output_dir(out, "-o"):
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
        run.finish()
    if result.skipped:
        shown = "; ".join(result.skipped[:3]) + (f" and {len(result.skipped) - 3} more" if len(result.skipped) > 3 else "")
        say(f"skipped {len(result.skipped)} of {len(files)} inputs that cannot be read: {shown}")
    return result


def _bar(files: Sequence[Path], shown: bool | None):
    from tqdm import tqdm

    total = sum(_frame_count(p) if is_video(p) else 1 for p in files)
    disable = (not shown) if shown is not None else (None if total >= PROGRESS_MIN_UNITS else True)
    # disable=None: tqdm's own rule, a bar only when stderr is a terminal
    return tqdm(total=total, unit="img", desc="predict", leave=False, file=sys.stderr, disable=disable)


def _frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if cap.isOpened() else 0
    finally:
        cap.release()


class _Run:
    """The state of one predict run: the models, the results gathered so far, OUT/."""

    def __init__(self, first: Model, second: Model | None, flip: bool, result: PredictResult, out: Path):
        self.first, self.second, self.flip, self.result, self.out = first, second, flip, result, out
        self.results: list[dict] = []
        self.compare_results: list[dict] = []

    def _both(self, image: np.ndarray, boxes: list[Box] | None):
        """Each model's (joints, scores) and the box scores, every model cropping at its own input size."""
        outs, box_scores = [], []
        for m in (self.first, self.second):
            if m is None:
                continue
            centers, scales, box_scores = persons(image.shape, boxes, m.meta.input_size)
            if len(centers):
                outs.append(m.predict(image, centers, scales, self.flip))
            else:
                j = m.meta.num_joints
                outs.append((np.zeros((0, j, 2), np.float32), np.zeros((0, j, 1), np.float32)))
        return outs, box_scores

    def _picture(self, image: np.ndarray, outs) -> np.ndarray:
        if self.second is None:
            return overlay(image, self.first.meta, *outs[0])
        return side_by_side(image, self.first.meta, outs[0], outs[1], (self.first.path.name, self.second.path.name))

    def _coco(self, image_id: Any, outs, box_scores) -> tuple[list[dict], list[dict]]:
        def results(joints, scores):
            if not len(joints):
                return []
            if _coco_joints(joints):  # eval's own results and rescoring
                return coco_results([image_id] * len(joints), joints, scores, box_scores)
            return _plain_results(image_id, joints, scores, box_scores)

        return results(*outs[0]), (results(*outs[1]) if len(outs) > 1 else [])

    def image(self, path: Path, image_id: Any, boxes: list[Box] | None, name: str) -> None:
        t0 = time.perf_counter()
        try:
            image = read_image(path)
        except DataError as e:
            self.result.skipped.append(f"{path}: {_why(e)}")
            return
        outs, box_scores = self._both(image, boxes)
        self.result.seconds += time.perf_counter() - t0
        first, second = self._coco(image_id, outs, box_scores)
        self.results += first
        self.compare_results += second
        self.result.images += 1
        self.result.people += len(outs[0][0])
        self.result.image_ids[str(path)] = image_id
        ok, buf = cv2.imencode(".jpg", self._picture(image, outs))
        if not ok:
            raise PosequantError(f"cannot encode the picture of {path}: OpenCV's JPEG encoder failed")
        self.result.files.append(str(write_bytes_atomic(self.out / name, buf.tobytes(), "-o")))

    def video(self, path: Path, name: str, bar) -> None:
        cap = cv2.VideoCapture(str(path))
        try:
            ok, frame = cap.read() if cap.isOpened() else (False, None)
            if not ok:
                self.result.skipped.append(f"{path}: not a readable video (OpenCV decodes no frame)")
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
            cap.release()

    def _frames(self, cap, frame: np.ndarray, fps: float, video_path: Path, lines_path: Path, bar) -> None:
        writer = None
        try:
            with open(lines_path, "w", encoding="utf-8") as lines:
                index = 0
                while frame is not None:
                    t0 = time.perf_counter()
                    outs, box_scores = self._both(frame, None)
                    self.result.seconds += time.perf_counter() - t0
                    picture = self._picture(frame, outs)
                    if writer is None:
                        h, w = picture.shape[:2]
                        writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise PosequantError(f"cannot write {video_path.name}: OpenCV has no mp4v video "
                                                 "encoder here; install opencv-python (not -headless builds without it)")
                    writer.write(picture)
                    first, second = self._coco(index, outs, box_scores)
                    line = {"frame": index, "time_s": index / fps, "people": first}
                    if self.second is not None:
                        line["compare"] = second
                    lines.write(json.dumps(line) + "\n")
                    self.result.frames += 1
                    self.result.people += len(outs[0][0])
                    bar.update(1)
                    index += 1
                    t0 = time.perf_counter()  # decoding a frame counts, as reading an image does
                    ok, frame = cap.read()
                    self.result.seconds += time.perf_counter() - t0
                    frame = frame if ok else None
        finally:
            if writer is not None:
                writer.release()

    def finish(self) -> None:
        out, r = self.out, self.result
        write_text_atomic(out / RESULTS_FILE, json.dumps(self.results) + "\n", "-o")
        r.files.insert(0, str(out / RESULTS_FILE))
        if self.second is not None:
            write_text_atomic(out / COMPARE_RESULTS_FILE, json.dumps(self.compare_results) + "\n", "-o")
            r.files.insert(1, str(out / COMPARE_RESULTS_FILE))
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
    head = (f"predict: {', '.join(units)}, {result.people} people in {result.seconds:.2f} s "
            f"({result.ms_per_unit:.1f} ms per {'image' if not result.frames else 'image/frame'}; "
            f"{result.backend} on {result.device}, flip {'on' if result.flip else 'off'})")
    lines = [head]
    if result.skipped:
        lines.append(f"  skipped {len(result.skipped)} unreadable inputs (see {SUMMARY_FILE})")
    lines.append(f"wrote {len(result.files)} files in {result.out_dir}: {RESULTS_FILE}"
                 + (f", {COMPARE_RESULTS_FILE}" if result.compare else "") + ", pictures, " + SUMMARY_FILE)
    return "\n".join(lines)
