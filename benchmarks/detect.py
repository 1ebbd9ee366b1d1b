"""Person detection, the first stage of top-down pose: boxes with scores on a raw photo.

Two sources of person boxes, one result type (:class:`Box`, image pixels, x y w h):

- a detector ONNX file (:func:`open_detector`, then :meth:`Detector.detect` per BGR image): a layout
  from :data:`LAYOUTS` checks the graph's shapes, prepares the input and decodes the output. YOLOX
  (:class:`YoloxLayout`, Megvii's official export) is the one there is; another layout is a class
  with the same four members added to the table;
- a COCO detection-results JSON (:func:`read_detections`: ``[{"image_id" or "file_name", "bbox",
  "score", "category_id"}, ...]``), as HRNet's ``COCO_BBOX_FILE`` and ``predict --boxes`` take.

The YOLOX decoding is YOLOX's own evaluation path (``yolox/utils/boxes.py::postprocess``): a cell's
class is its best class, its score objectness x that class's score; cells whose class is person and
whose score is at least the threshold go through non-maximum suppression (OpenCV's
``cv2.dnn.NMSBoxes``: IoU of float boxes, a box overlapping a kept one by more than ``iou`` goes).
Boxes are not clipped to the photo (YOLOX does not clip, and HRNet crops detection boxes as given).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from posequant.core.errors import DataError, PosequantError
from posequant.core.numbers import check_number
from posequant.core.opencv import cv2

DETECTOR_SUFFIXES = (".onnx",)
DEFAULT_IOU = 0.65  # YOLOX's nmsthre (its COCO evaluation)
PREDICT_SCORE = 0.3  # YOLOX's demos draw boxes scoring 0.3 or more
EVAL_SCORE = 0.01  # YOLOX's test_conf: AP counts low-scoring boxes too
PERSON = 0  # COCO's person in the 80-class order detectors are trained with
DETECTIONS_FORMAT = '[{"image_id" or "file_name", "bbox": [x, y, w, h], "score"}, ...]'


class DetectorError(PosequantError):
    """A detector file that cannot be used: missing, damaged, or not a layout posequant decodes."""


@dataclass(frozen=True)
class Box:
    """One person box: [x, y, w, h] in image pixels and its score (1 when a file gives none)."""

    bbox: tuple[float, float, float, float]
    score: float


# ---- the YOLOX layout ---------------------------------------------------------------------------


def letterbox(image: np.ndarray, size: tuple[int, int], pad: int = 114) -> tuple[np.ndarray, float]:
    """YOLOX's ``preproc``: the image resized by r = min(H / h, W / w) (bilinear), placed at the top-left
    of an H x W canvas filled with ``pad``; returns the canvas (uint8, the image's channel order) and r."""
    height, width = size
    h, w = image.shape[:2]
    r = min(height / h, width / w)
    canvas = np.full((height, width, 3), pad, np.uint8)
    nh, nw = int(h * r), int(w * r)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas, r


def grid_cells(size: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each output row's grid cell (x, y) and stride: the cells of each stride in row-major order,
    strides in the given order (YOLOX's ``demo_postprocess``)."""
    cells, cell_strides = [], []
    for s in strides:
        gy, gx = np.mgrid[0:size[0] // s, 0:size[1] // s]
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        cell_strides.append(np.full(gx.size, s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(cell_strides).astype(np.float32)[:, None]


def nms(boxes_xywh: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes non-maximum suppression keeps, best score first (``cv2.dnn.NMSBoxes``).

    A box goes when its IoU with a kept, higher-scoring box is above ``iou`` (OpenCV compares in float32).
    Every score must be above 0 (OpenCV drops the others)."""
    if not len(boxes_xywh):
        return np.zeros(0, np.int64)
    keep = cv2.dnn.NMSBoxes(np.asarray(boxes_xywh, np.float64).tolist(), np.asarray(scores, np.float64).tolist(),
                            0.0, float(iou))
    return np.asarray(keep, np.int64).reshape(-1)


@dataclass(frozen=True)
class YoloxLayout:
    """YOLOX's ONNX export: 1 x 3 x H x W BGR 0-255 input (letterboxed, pad 114), 1 x cells x (5 + classes)
    output: per cell x, y, log w, log h (grid units), objectness and class scores (already sigmoid-ed)."""

    name: str = "yolox"
    strides: tuple[int, ...] = (8, 16, 32)
    pad: int = 114

    def cells(self, size: tuple[int, int]) -> int:
        return sum((size[0] // s) * (size[1] // s) for s in self.strides)

    def describe(self) -> str:
        return ("YOLOX's layout: one 1 x 3 x H x W float input (H, W multiples of 32) and one 1 x cells x "
                "(5 + classes) output, cells = (H/8)(W/8) + (H/16)(W/16) + (H/32)(W/32); 1x3549x85 at 416x416")

    def problem(self, input_dims: list, output_dims: list) -> str | None:
        """What does not fit the layout in the graph's static dims (None: it fits, as far as they say)."""
        if len(input_dims) != 4 or input_dims[1] != 3 or (isinstance(input_dims[0], int) and input_dims[0] > 1):
            return f"input is {_show(input_dims)}, not 1 x 3 x H x W"
        h, w = input_dims[2], input_dims[3]
        if not (isinstance(h, int) and isinstance(w, int) and h and w):
            return f"input is {_show(input_dims)}: its height and width must be fixed"
        if h % self.strides[-1] or w % self.strides[-1]:
            return f"input is {_show(input_dims)}: height and width must be multiples of {self.strides[-1]}"
        want = self.cells((h, w))
        if len(output_dims) != 3:
            return f"output is {_show(output_dims)}, not 1 x {want} x (5 + classes)"
        cells, width = output_dims[1], output_dims[2]
        if (isinstance(cells, int) and cells and cells != want) or (isinstance(width, int) and width and width < 6):
            return f"output is {_show(output_dims)}, not 1 x {want} x (5 + classes) for a {h}x{w} input"
        return None

    def prepare(self, image_bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        canvas, r = letterbox(image_bgr, size, self.pad)
        return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), r

    def decode(self, output: np.ndarray, size: tuple[int, int], ratio: float, score: float, iou: float) -> list[Box]:
        out = np.asarray(output, np.float32).reshape(-1, output.shape[-1])
        if len(out) != self.cells(size) or out.shape[1] < 6:
            raise DetectorError(f"the detector returned {_show(list(np.shape(output)))}; {self.describe()}")
        classes = out[:, 5:]
        best = classes.argmax(axis=1)
        scores = out[:, 4] * classes[np.arange(len(out)), best]
        chosen = np.flatnonzero((best == PERSON) & (scores >= score))
        if not len(chosen):
            return []
        grid, stride = grid_cells(size, self.strides)
        centre = (out[chosen, :2] + grid[chosen]) * stride[chosen]
        wh = np.exp(out[chosen, 2:4]) * stride[chosen]
        boxes = np.concatenate([centre - wh / 2, wh], axis=1).astype(np.float64) / ratio
        keep = nms(boxes, scores[chosen], iou)
        return [Box(tuple(float(v) for v in boxes[k]), float(scores[chosen][k])) for k in keep]


class Layout(Protocol):
    """What a detector layout provides (:class:`YoloxLayout` is one)."""

    name: str

    def describe(self) -> str: ...
    def problem(self, input_dims: list, output_dims: list) -> str | None: ...
    def prepare(self, image_bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]: ...
    def decode(self, output: np.ndarray, size: tuple[int, int], ratio: float, score: float,
               iou: float) -> list[Box]: ...


LAYOUTS: dict[str, Layout] = {"yolox": YoloxLayout()}


def _show(dims) -> str:
    return "x".join(str(d) for d in dims) if len(dims) else "a scalar"


# ---- the detector -------------------------------------------------------------------------------


def check_thresholds(score: float, iou: float) -> tuple[float, float]:
    """``--det-score`` and ``--det-iou``: finite, above 0, at most 1."""
    return (check_number("--det-score", score, above=True, maximum=1.0),
            check_number("--det-iou", iou, above=True, maximum=1.0))


@dataclass
class Detector:
    """A person detector ready to run: its file, layout, input size (H, W), thresholds and runner."""

    path: Path
    layout: Layout
    size: tuple[int, int]
    score: float
    iou: float
    runner: Any
    precision: str
    seconds: float = 0.0  # time in detect(): preparing, inference and decoding
    calls: int = 0

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        """The person boxes of one BGR image, best first."""
        t0 = time.perf_counter()
        x, ratio = self.layout.prepare(image_bgr, self.size)
        output = self.runner.infer(x)
        if not np.isfinite(output).all():
            raise DetectorError(f"--detector {self.path} output NaN or inf: the detector is broken; export it again")
        boxes = self.layout.decode(output, self.size, ratio, self.score, self.iou)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return boxes

    def settings(self) -> dict[str, Any]:
        return {"detector": str(self.path), "layout": self.layout.name, "input_size": list(self.size),
                "precision": self.precision, "det_score": self.score, "det_iou": self.iou}


def open_detector(path: str | os.PathLike, *, backend: str | None = None, device: str = "cpu",
                  score: float = PREDICT_SCORE, iou: float = DEFAULT_IOU, option: str = "--detector") -> Detector:
    """A detector ONNX file (float or INT8/QDQ) on ``backend`` (ort, openvino, tensorrt), checked against
    the layouts posequant decodes before it runs. A detector needs no posequant metadata."""
    from posequant.core.onnxfile import ModelFileError, load_onnx

    from .latency import onnx_precision
    from .runners import make_runner

    path = Path(path)
    score, iou = check_thresholds(score, iou)
    if path.suffix.lower() not in DETECTOR_SUFFIXES:
        raise DetectorError(f"{option} {path}: a detector is an ONNX file (.onnx), e.g. YOLOX's export")
    try:
        graph = load_onnx(path, what=option)
    except ModelFileError as e:  # missing, empty, damaged: its line, pointing at the detector's own exporter
        raise DetectorError(str(e).replace("`posequant export-pose`", "your detector's exporter")) from None
    if any(p.key == "posequant_schema" for p in graph.metadata_props):
        raise DetectorError(f"{option} {path} is a posequant pose model, not a person detector: give a detector "
                            "such as YOLOX's ONNX export")
    inputs = [i for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
    layout, problems = None, []
    if len(inputs) == 1 and len(graph.graph.output) == 1:
        for candidate in LAYOUTS.values():
            problem = candidate.problem(_dims(inputs[0]), _dims(graph.graph.output[0]))
            if problem is None:
                layout = candidate
                break
            problems.append(f"{candidate.name}: {problem}")
    else:
        problems.append(f"{len(inputs)} inputs and {len(graph.graph.output)} outputs, not one of each")
    expected = " or ".join(candidate.describe() for candidate in LAYOUTS.values())
    if layout is None:
        raise DetectorError(f"{option} {path} is not a detector layout posequant decodes ({'; '.join(problems)}); "
                            f"expected {expected}")
    if inputs[0].type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT: the layouts take float pixels
        raise DetectorError(f"{option} {path} takes a non-float input; expected {expected}")
    dims = _dims(inputs[0])
    try:
        runner = make_runner(backend, onnx_path=path, device=device)
    except ModelFileError as e:
        raise DetectorError(f"{option} {path}: {str(e).split(': ', 1)[-1].split(': re-export')[0]}: export the "
                            "detector again") from None
    return Detector(path, layout, (int(dims[2]), int(dims[3])), score, iou, runner, onnx_precision(graph))


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


# ---- boxes for a set of images ----------------------------------------------------------------------


@dataclass
class PersonBoxes:
    """Person boxes for a set of images, keyed by image (a COCO image id, or a file), and where they came from."""

    by_image: dict[Any, list[Box]]
    source: str  # "detector" or "file"
    path: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the detector's time over these images
    skipped: list[Path] = field(default_factory=list)  # images that could not be read (left out)

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.by_image.values())

    def to_dict(self) -> dict[str, Any]:
        images = len(self.by_image)
        return {"source": self.source, "path": self.path, "boxes": self.count, "images": images,
                **self.settings, "detector_ms_per_image": 1000 * self.seconds / images if images and self.seconds
                else None}


def detect_images(detector: Detector, images: dict[Any, Path], read: Callable[[Path], np.ndarray | None], *,
                  progress_bar: bool = False) -> PersonBoxes:
    """Run ``detector`` on each image (``read`` decodes it, None: skip it); boxes keyed as ``images`` is."""
    from tqdm import tqdm

    by_image: dict[Any, list[Box]] = {}
    skipped = []
    before = detector.seconds
    for key, path in tqdm(images.items(), total=len(images), unit="img", desc="detect", leave=False,
                          disable=not progress_bar):
        image = read(path)
        if image is None:
            skipped.append(path)
            continue
        by_image[key] = detector.detect(image)
    return PersonBoxes(by_image, "detector", str(detector.path), detector.settings(), detector.seconds - before,
                       skipped)


# ---- detection-results files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One entry of a detection-results JSON, checked: which image (by id or file name), box, score, class."""

    image_id: Any
    file_name: str | None
    box: Box
    category_id: Any


def read_detections(path: str | os.PathLike, option: str = "--boxes") -> list[Detection]:
    """The entries of a COCO detection-results JSON; one line naming the entry for anything else."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{option} {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{option} {path} is not readable JSON ({e}): give COCO detection results "
                        f"{DETECTIONS_FORMAT}") from None
    if not isinstance(entries, list):
        raise DataError(f"{option} {path} holds a JSON {type(entries).__name__}, not a list of detections: give "
                        f"COCO detection results {DETECTIONS_FORMAT}")
    out = []
    for i, e in enumerate(entries):
        where = f"{option} {path} (entry {i})"
        if not isinstance(e, dict):
            raise DataError(f"{where} is not an object: each detection is {{\"image_id\", \"bbox\", \"score\"}}")
        bbox = e.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bbox)):
            raise DataError(f"{where}: bbox {bbox!r} is not [x, y, w, h] (4 finite numbers): fix the file")
        score = e.get("score", 1.0)
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not np.isfinite(score):
            raise DataError(f"{where}: score {score!r} is not a finite number: fix the file")
        if "file_name" not in e and "image_id" not in e:
            raise DataError(f"{where} has neither image_id nor file_name: say which image each box is on")
        name = Path(str(e["file_name"])).name if "file_name" in e else None
        out.append(Detection(e.get("image_id"), name, Box(tuple(float(v) for v in bbox), float(score)),
                             e.get("category_id", 1)))
    return out


def coco_boxes(path: str | os.PathLike, images: dict[Any, Path], *, min_score: float = 0.0,
               option: str = "--boxes") -> PersonBoxes:
    """Person boxes of a COCO split from a detection-results JSON, as HRNet reads ``COCO_BBOX_FILE``
    (``_load_coco_person_detection_results``): entries of another category than 1 are left out, and those
    scoring below ``min_score`` (its ``IMAGE_THRE``, 0.0). ``images`` maps the annotation file's image ids to
    their files; an entry naming an image that is not among them is refused (it cannot be scored)."""
    detections = read_detections(path, option)
    by_name = {p.name: key for key, p in images.items()}
    by_image: dict[Any, list[Box]] = {key: [] for key in images}
    unknown = []
    for d in detections:
        known = isinstance(d.image_id, (int, float, str)) and d.image_id in by_image
        key = d.image_id if known else by_name.get(d.file_name) if d.file_name else None
        if key is None:
            unknown.append(repr(d.image_id) if d.file_name is None else repr(d.file_name))
            continue
        if d.category_id == 1 and d.box.score >= min_score:
            by_image[key].append(d.box)
    if unknown:
        shown = ", ".join(dict.fromkeys(unknown[:3]))
        raise DataError(f"{option} {path} has {len(unknown)} boxes on images the annotations do not list ({shown}): "
                        "give detections made on this split's images (image_id as in its annotation file)")
    return PersonBoxes(by_image, "file", str(path), {"min_score": min_score})
