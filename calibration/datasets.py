"""Pose datasets read the way the official Simple Baselines / HRNet code reads them.

Three layouts, detected from the folder:

- MPII (``annot/{split}.json`` + ``images/``): 1-based MATLAB coordinates, converted as
  ``lib/dataset/mpii.py`` does (centre moved down 15 * scale, scale x 1.25, then -1).
- COCO (``annotations/person_keypoints_{split}2017.json`` + ``{split}2017/``): one person per
  ground-truth box, cleaned and turned into centre/scale as ``lib/dataset/coco.py`` does.
- A plain folder of images (calibration only, top level only): one whole-image "person" per image.

Centres are 0-based pixels; scales are box sizes in units of 200 px (``pixel_std``).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from posequant.core.errors import DataError
from posequant.core.keypoints import COCO, MPII, KeypointSet
from posequant.core.transforms import PIXEL_STD

from .images import IMAGE_SUFFIXES, default_workers, image_size, read_image

FORMATS = ("mpii", "coco", "folder")
COCO_PADDING = 1.25  # HRNet's _xywh2cs enlarges every box by a quarter
# Default split per (format, purpose), first present wins.
DEFAULT_SPLITS = {
    ("mpii", "eval"): ("valid",),
    ("mpii", "calib"): ("train", "valid"),
    ("coco", "eval"): ("val",),
    ("coco", "calib"): ("train", "val"),
}
Purpose = Literal["eval", "calib"]
# An MPII scale is the person's height / 200 px: above 100 (a person 20000 px tall) it is no person.
MAX_MPII_SCALE = 100.0


@dataclass(frozen=True)
class Person:
    """One person to crop: where, how big, and (for annotated data) the ground-truth joints."""

    image: Path
    center: np.ndarray = field(compare=False)  # (2,) float64, 0-based pixels
    scale: np.ndarray = field(compare=False)  # (2,) float64, box size / 200 px
    joints: np.ndarray | None = field(compare=False)  # (J, 2) float64, 0-based pixels
    joints_vis: np.ndarray | None = field(compare=False)  # (J,) float64, 1 = labelled
    index: int  # position in the annotation file (or the folder listing)
    image_id: int | None = None  # COCO only
    ann_id: int | None = None  # COCO only
    bbox: tuple[float, float, float, float] | None = None  # COCO only: cleaned box, x y w h
    area: float | None = None  # COCO only: the annotation's area
    score: float | None = None  # a detection box's score (None: a ground-truth box)

    def __post_init__(self) -> None:
        # Own read-only float64 copies: the official code deep-copies each record before use;
        # read-only arrays make that unnecessary.
        for name in ("center", "scale", "joints", "joints_vis"):
            value = getattr(self, name)
            if value is not None:
                array = np.array(value, dtype=np.float64)
                array.flags.writeable = False
                object.__setattr__(self, name, array)

    def labelled(self, num_joints: int) -> np.ndarray:
        """Which joints the ground truth labels (all of them when it has no visibility flags)."""
        if self.joints_vis is None:
            return np.ones(num_joints, bool)
        return self.joints_vis > 0


@dataclass
class PoseDataset:
    """The people of one split, in the official order, plus what was left out."""

    root: Path
    format: str
    split: str | None
    keypoints: KeypointSet | None
    people: list[Person]
    skipped: list[Path] = field(default_factory=list)
    coco_json: Path | None = None
    listed: int | None = None  # MPII: records in annot/{split}.json, one per column of gt_{split}.mat
    # Records left out because their ground truth is degenerate ("image (entry 3): scale nan"); COCO
    # also lists their annotation ids, which scoring removes from the ground truth too.
    invalid: list[str] = field(default_factory=list)
    invalid_ann_ids: list[Any] = field(default_factory=list)
    annotation_file: Path | None = None
    # COCO: every image the annotation file lists (people or not), by image id, in its order: what a
    # detector runs on and detection boxes name
    image_files: dict[Any, Path] = field(default_factory=dict)

    def invalid_warning(self) -> str | None:
        """One line naming the records left out as degenerate (None when there are none)."""
        if not self.invalid:
            return None
        return (f"{len(self.invalid)} records of {self.annotation_file} have degenerate ground truth and were "
                f"left out: {_examples(self.invalid)}")

    def __len__(self) -> int:
        return len(self.people)

    def __getitem__(self, index: int) -> Person:
        return self.people[index]

    def __iter__(self) -> Iterator[Person]:
        return iter(self.people)

    def __repr__(self) -> str:
        return (
            f"PoseDataset(format={self.format!r}, split={self.split!r}, people={len(self.people)}, "
            f"skipped={len(self.skipped)}, root='{self.root}')"
        )


def open_dataset(
    root: str | os.PathLike,
    *,
    input_size: tuple[int, int],
    format: str | None = None,
    split: str | None = None,
    purpose: Purpose = "eval",
    skip_missing: bool = False,
) -> PoseDataset:
    """Read the dataset at ``root``; ``input_size`` is the model input (H, W)."""
    if purpose not in ("eval", "calib"):
        raise ValueError(f"purpose must be 'eval' or 'calib', not {purpose!r}")
    assert len(input_size) == 2 and min(input_size) > 0, f"input_size must be (H, W), got {input_size}"
    root = Path(root)
    if root.is_file():
        raise DataError(f"dataset {root} is a file, not a folder: give the dataset's root folder "
                        f"(MPII: {_LAYOUTS['mpii']}; COCO: {_LAYOUTS['coco']}; or a folder of images)")
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist: check the path")
    fmt = _check_format(format) if format else _detect_format(root)
    if fmt == "folder":
        if split is not None:
            raise DataError(f"{root} is a plain folder of images, which has no splits: leave --split out")
        return _load_folder(root, input_size, skip_missing)
    available = _mpii_splits(root) if fmt == "mpii" else _coco_splits(root)
    if not available:
        raise DataError(f"{root} is not a {fmt.upper()} dataset: expected {_LAYOUTS[fmt]}")
    chosen = _choose_split(root, fmt, available, split, purpose)
    if fmt == "mpii":
        return _load_mpii(root, chosen, skip_missing)
    return _load_coco(root, chosen, input_size, skip_missing)


def available_splits(root: str | os.PathLike, format: str) -> list[str]:
    """The splits of an MPII or COCO dataset that have annotations (and, for COCO, images)."""
    root = Path(root)
    return _mpii_splits(root) if format == "mpii" else _coco_splits(root) if format == "coco" else []


def box_to_center_scale(
    box_xywh: Sequence[float], input_size: tuple[int, int], *, padding: float = COCO_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """HRNet's ``_xywh2cs``: box centre, box grown to the input's aspect ratio, / 200, x padding.

    Computed in float32 like the official code, so crops match it bit for bit.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    aspect_ratio = input_size[1] / input_size[0]  # W / H
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * padding
    return center.astype(np.float64), scale.astype(np.float64)


def load_mpii_gt(path: str | os.PathLike) -> dict[str, Any]:
    """The official MPII evaluation fields from ``gt_{split}.mat`` (a file, or a dataset root).

    Returns the arrays in the official layouts: ``dataset_joints`` (1 x J names),
    ``jnt_missing`` (J x N), ``pos_gt_src`` (J x 2 x N, 1-based), ``headboxes_src`` (2 x 2 x N);
    plus ``joint_names`` (list of J str) for convenience.
    """
    from scipy.io import loadmat

    path = Path(path)
    if path.is_dir():
        path = path / "annot" / "gt_valid.mat"
    if not path.is_file():
        raise DataError(f"MPII ground truth {path} does not exist: it ships with the MPII annotations (annot/gt_valid.mat)")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged files
        raise DataError(f"{path} is not a readable .mat file ({e}): download it again") from None
    gt = {}
    for name in ("dataset_joints", "jnt_missing", "pos_gt_src", "headboxes_src"):
        if name not in mat:
            raise DataError(f"{path} has no field {name!r}: it is not an MPII gt_*.mat file")
        gt[name] = mat[name]
    _check_mpii_gt_shapes(gt, path)
    gt["joint_names"] = [str(np.ravel(n)[0]) for n in np.ravel(gt["dataset_joints"])]
    return gt


# ---- layout detection and splits -------------------------------------------------------------

_LAYOUTS = {
    "mpii": "ROOT/annot/{split}.json and ROOT/images/",
    "coco": "ROOT/annotations/person_keypoints_{split}2017.json and ROOT/{split}2017/",
    "folder": f"image files ({', '.join(IMAGE_SUFFIXES)})",
}


def _check_format(format: str) -> str:
    fmt = format.lower()
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def _detect_format(root: Path) -> str:
    if _mpii_splits(root):
        return "mpii"
    if _coco_splits(root):
        return "coco"
    if _image_files(root):
        return "folder"
    if not any(root.iterdir()):
        raise DataError(f"dataset folder {root} is empty: point to an MPII or COCO dataset, or a folder of images")
    expected = "; ".join(f"{fmt.upper()}: {layout}" for fmt, layout in _LAYOUTS.items())
    raise DataError(f"cannot tell the dataset layout of {root}: expected {expected}")


def _mpii_splits(root: Path) -> list[str]:
    if not (root / "images").is_dir():
        return []
    return sorted(p.stem for p in (root / "annot").glob("*.json"))


def _coco_splits(root: Path) -> list[str]:
    """Splits with both annotations and images: the annotation zip ships train and val, often
    without the train images, and calibration must then fall back to val."""
    prefix, suffix = "person_keypoints_", "2017.json"
    names = (p.name for p in (root / "annotations").glob(f"{prefix}*{suffix}"))
    splits = (n[len(prefix):-len(suffix)] for n in names)
    return sorted(s for s in splits if _coco_image_dir(root, s) is not None)


def _choose_split(root: Path, fmt: str, available: list[str], split: str | None, purpose: str) -> str:
    if split is not None:
        wanted = split[:-4] if fmt == "coco" and split.endswith("2017") else split
        if wanted not in available:
            raise DataError(f"{root} has no split {split!r} with both annotations and images: choose one of {', '.join(available)}")
        return wanted
    for candidate in DEFAULT_SPLITS[(fmt, purpose)]:
        if candidate in available:
            return candidate
    if len(available) == 1:
        return available[0]
    raise DataError(f"{root} has splits {', '.join(available)} and none is the default for {purpose}: pass --split")


# ---- annotation fields -------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix or regenerate it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}): check the file") from None


@dataclass(frozen=True)
class _Entry:
    """One record of an annotation file; its accessors fail with file, record and field named."""

    file: Path
    label: str  # e.g. "entry 3" or "annotations[3]"
    data: Any

    def fail(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.file}: {self.label}, field {name!r}: {problem}; fix or regenerate the annotation file")

    def get(self, name: str) -> Any:
        if not isinstance(self.data, dict):
            raise DataError(f"{self.file}: {self.label} is {type(self.data).__name__}, not an object; fix or regenerate the annotation file")
        if name not in self.data:
            raise self.fail(name, "missing")
        return self.data[name]

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"expected a file name, got {value!r}")
        return value

    def number(self, name: str) -> float:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"expected a number, got {value!r}")
        return float(value)

    def array(self, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
        value = self.get(name)
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail(name, f"expected {what} (numbers)") from None
        if array.shape != shape:
            raise self.fail(name, f"expected {what}, got shape {array.shape}")
        return array


# ---- MPII --------------------------------------------------------------------------------------


def _load_mpii(root: Path, split: str, skip_missing: bool) -> PoseDataset:
    ann_file = root / "annot" / f"{split}.json"
    records = _read_json(ann_file)
    if not isinstance(records, list):
        raise DataError(f"{ann_file}: expected a list of people, got {type(records).__name__}; fix or regenerate it")
    # The official test split has no joints; every other split must have them.
    people = [
        _mpii_person(_Entry(ann_file, f"entry {i}", r), root / "images", i, need_joints=split != "test")
        for i, r in enumerate(records)
    ]
    people, invalid = _without_invalid(people, _mpii_problems(people, records), ann_file)
    people, skipped = _drop_missing(people, ann_file, skip_missing)
    return PoseDataset(root, "mpii", split, MPII, people, skipped, listed=len(records),
                       invalid=[label for _, label in invalid], annotation_file=ann_file)


def _mpii_problems(people: list[Person], records: list[dict]) -> list[str | None]:
    """What is degenerate about each record (None: nothing): scale, centre, joints, visibility flags."""
    images = list(dict.fromkeys(p.image for p in people))
    with ThreadPoolExecutor(max_workers=default_workers()) as pool:  # headers only, for the centre check
        sizes = dict(zip(images, pool.map(image_size, images)))
    return [_mpii_problem(p, np.asarray(r["center"], np.float64), float(r["scale"]), sizes[p.image])
            for p, r in zip(people, records)]


def _mpii_problem(p: Person, center: np.ndarray, scale: float, size: tuple[int, int] | None) -> str | None:
    """``center``/``scale`` as the file has them (1-based; centre -1 is the official "none")."""
    if not np.isfinite(scale) or scale <= 0:
        return f"scale {scale:g}"
    if scale > MAX_MPII_SCALE:
        return f"scale {scale:g} (a person {scale * PIXEL_STD:.0f} px tall)"
    if not np.isfinite(center).all():
        return f"centre {center.tolist()}"
    if p.joints is not None:
        if not np.isfinite(p.joints).all():
            return "joints hold NaN or inf"
        flags = set(np.unique(p.joints_vis).tolist()) - {0.0, 1.0}
        if flags:
            return f"joints_vis holds {sorted(flags)[0]:g} (expected 0 or 1)"
    if size is not None and center[0] != -1:
        box = float(p.scale[0]) * PIXEL_STD
        (h, w), (x, y) = size, p.center
        if not (-box <= x <= w - 1 + box and -box <= y <= h - 1 + box):
            return f"centre {center.tolist()} is far outside the {w}x{h} image"
    return None


def _without_invalid(people: list[Person], problems: list[str | None], ann_file: Path
                     ) -> tuple[list[Person], list[tuple[Person, str]]]:
    """The people whose ground truth is usable, and the others with a label naming image, record and problem."""
    invalid = [(p, f"{p.image.name} (record {p.index}): {why}") for p, why in zip(people, problems) if why]
    if people and len(invalid) == len(people):
        raise DataError(f"every one of the {len(people)} people in {ann_file} has degenerate ground truth "
                        f"({_examples([label for _, label in invalid])}): fix or regenerate the annotation file")
    return [p for p, why in zip(people, problems) if not why], invalid


def _mpii_person(entry: _Entry, image_dir: Path, index: int, *, need_joints: bool) -> Person:
    image = image_dir / entry.text("image")
    c = entry.array("center", (2,), "[x, y]")
    s = np.array([entry.number("scale")] * 2)
    if c[0] != -1:  # as mpii.py: move the centre down and enlarge to avoid cutting off limbs
        c[1] = c[1] + 15 * s[1]
        s = s * 1.25
    c = c - 1  # MATLAB 1-based -> 0-based
    joints = joints_vis = None
    if need_joints or "joints" in entry.data:
        n = MPII.num_joints
        joints = entry.array("joints", (n, 2), f"{n} [x, y] pairs") - 1
        joints_vis = entry.array("joints_vis", (n,), f"{n} visibility flags")
    return Person(image=image, center=c, scale=s, joints=joints, joints_vis=joints_vis, index=index)


def _check_mpii_gt_shapes(gt: dict[str, np.ndarray], path: Path) -> None:
    joints = gt["dataset_joints"].size
    missing = gt["jnt_missing"]
    if missing.ndim != 2 or missing.shape[0] != joints:
        raise DataError(f"{path}: 'jnt_missing' has shape {missing.shape}, expected ({joints}, N); the file is damaged")
    count = missing.shape[1]
    expected = {"pos_gt_src": (joints, 2, count), "headboxes_src": (2, 2, count)}
    for name, shape in expected.items():
        if gt[name].shape != shape:
            raise DataError(f"{path}: {name!r} has shape {gt[name].shape}, expected {shape}; the file is damaged")
    for name in ("jnt_missing", "pos_gt_src", "headboxes_src"):
        if not np.issubdtype(gt[name].dtype, np.number):
            raise DataError(f"{path}: {name!r} holds {gt[name].dtype} values, not numbers; the file is damaged")
    # A NaN head box or labelled joint would silently drop out of PCKh: name the first one.
    labelled = np.broadcast_to((missing == 0)[:, None, :], gt["pos_gt_src"].shape)
    checks = {"headboxes_src": np.isfinite(gt["headboxes_src"]),
              "pos_gt_src": np.isfinite(gt["pos_gt_src"]) | ~labelled}
    for name, finite in checks.items():
        if not finite.all():
            person = int(np.argwhere(~finite)[0][-1])
            raise DataError(f"{path}: person {person}, field {name!r}: not a finite number; "
                            "the file is damaged: use the official gt_valid.mat")


# ---- COCO --------------------------------------------------------------------------------------


def _load_coco(root: Path, split: str, input_size: tuple[int, int], skip_missing: bool) -> PoseDataset:
    ann_file = root / "annotations" / f"person_keypoints_{split}2017.json"
    data = _read_json(ann_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: no {key!r} list: it is not a COCO keypoints file")
    image_dir = _coco_image_dir(root, split)
    assert image_dir is not None  # _coco_splits lists only splits with images
    person_ids = _coco_person_category_ids(data["categories"], ann_file)
    _check_unique_ids(data, ann_file)
    anns_by_image: dict[Any, list[int]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        anns_by_image[_Entry(ann_file, f"annotations[{i}]", ann).get("image_id")].append(i)
    people, invalid, invalid_ids = [], [], []
    # Official order: images as listed, then each image's annotations as listed.
    for j, image in enumerate(data["images"]):
        image_entry = _Entry(ann_file, f"images[{j}]", image)
        for i in anns_by_image.get(image_entry.get("id"), []):
            entry = _Entry(ann_file, f"annotations[{i}]", data["annotations"][i])
            why = _coco_problem(entry, image_entry, person_ids)
            if why:
                invalid.append(f"{image_entry.text('file_name')} (annotations[{i}], id {entry.get('id')}): {why}")
                invalid_ids.append(entry.get("id"))
                continue
            person = _coco_person(entry, i, image_entry, image_dir, person_ids, input_size)
            if person is not None:
                people.append(person)
    if invalid and not people:
        raise DataError(f"every person annotation in {ann_file} has degenerate ground truth "
                        f"({_examples(invalid)}): fix or regenerate the annotation file")
    people, skipped = _drop_missing(people, ann_file, skip_missing)
    files = {}
    for j, image in enumerate(data["images"]):
        entry = _Entry(ann_file, f"images[{j}]", image)
        files[entry.get("id")] = image_dir / entry.text("file_name")
    return PoseDataset(root, "coco", split, COCO, people, skipped, coco_json=ann_file, invalid=invalid,
                       invalid_ann_ids=invalid_ids, annotation_file=ann_file, image_files=files)


def _check_unique_ids(data: dict, ann_file: Path) -> None:
    """pycocotools indexes images and annotations by id: a repeated id silently replaces its twin
    (AP -1 when every match is lost), so refuse them."""
    for key in ("images", "annotations"):
        ids = [_Entry(ann_file, f"{key}[{i}]", x).get("id") for i, x in enumerate(data[key])]
        counts = Counter(ids)
        repeated = [i for i, n in counts.items() if n > 1]
        if repeated:
            shown = ", ".join(repr(i) for i in repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
            what = "image" if key == "images" else "annotation"
            raise DataError(f"{ann_file}: {len(repeated)} {what} id(s) occur more than once ({shown}): every "
                            f"{what} needs its own id; fix or regenerate the annotation file")


def _coco_problem(entry: _Entry, image: _Entry, person_ids: set[Any]) -> str | None:
    """What is degenerate about a person annotation HRNet would use (None: nothing, or HRNet drops it anyway)."""
    if entry.get("iscrowd") or entry.get("category_id") not in person_ids:
        return None  # the official code leaves these out silently
    width, height = image.number("width"), image.number("height")
    if not (np.isfinite([width, height]).all() and width > 0 and height > 0):
        return f"image size {width:g}x{height:g}"
    box = entry.array("bbox", (4,), "[x, y, w, h]")
    if not np.isfinite(box).all():
        return f"bbox {box.tolist()}"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox size {box[2]:g}x{box[3]:g}"
    if not np.isfinite(entry.number("area")):
        return f"area {entry.number('area')}"
    n = COCO.num_joints
    keypoints = entry.array("keypoints", (n * 3,), f"{n} x [x, y, v] numbers").reshape(n, 3)
    if not np.isfinite(keypoints).all():
        return "keypoints hold NaN or inf"
    flags = set(np.unique(keypoints[:, 2]).tolist()) - {0.0, 1.0, 2.0}
    if flags:
        return f"keypoint visibility {sorted(flags)[0]:g} (expected 0, 1 or 2)"
    return None


def _coco_image_dir(root: Path, split: str) -> Path | None:
    for candidate in (root / f"{split}2017", root / "images" / f"{split}2017"):  # ours, HRNet's
        if candidate.is_dir():
            return candidate
    return None


def _coco_person_category_ids(categories: list[Any], ann_file: Path) -> set[Any]:
    ids = {c.get("id") for c in categories if isinstance(c, dict) and c.get("name") == "person"}
    if not ids:
        raise DataError(f"{ann_file}: no 'person' category: it is not a COCO person keypoints file")
    return ids


def _coco_person(
    entry: _Entry, index: int, image: _Entry, image_dir: Path, person_ids: set[Any], input_size: tuple[int, int]
) -> Person | None:
    """The person of one annotation, or None where HRNet drops it (crowd, bad box, no keypoints)."""
    if entry.get("iscrowd"):
        return None
    if entry.get("category_id") not in person_ids:
        return None
    box = _clean_coco_box(entry, image.number("width"), image.number("height"))
    if box is None:
        return None
    n = COCO.num_joints
    keypoints = entry.array("keypoints", (n * 3,), f"{n} x [x, y, v] numbers").reshape(n, 3)
    if keypoints.max() == 0:  # no keypoint annotated
        return None
    center, scale = box_to_center_scale(box, input_size)
    return Person(
        image=image_dir / image.text("file_name"),
        center=center,
        scale=scale,
        joints=keypoints[:, :2],  # COCO keypoints are already 0-based pixels
        joints_vis=(keypoints[:, 2] > 0).astype(np.float64),
        index=index,
        image_id=entry.get("image_id"),
        ann_id=entry.get("id"),
        bbox=box,
        area=entry.number("area"),
    )


def _clean_coco_box(entry: _Entry, width: float, height: float) -> tuple[float, float, float, float] | None:
    """HRNet's box sanitising: clip to the image; None for empty boxes or zero area."""
    box = clip_box(entry.array("bbox", (4,), "[x, y, w, h]"), width, height)
    return box if entry.number("area") > 0 else None


def box_people(image_files: dict[Any, Path], boxes: dict[Any, Sequence[tuple[Sequence[float], float]]],
               input_size: tuple[int, int]) -> list[Person]:
    """One person per detection box, as HRNet's ``_load_coco_person_detection_results``: the box as given
    (not clipped, unlike ground-truth boxes) through the same :func:`box_to_center_scale`, its score kept.
    ``boxes`` maps an image id of ``image_files`` to its (x y w h box, score) pairs; images in ``image_files``
    order, each image's boxes in the order given."""
    people = []
    for image_id, path in image_files.items():
        for bbox, score in boxes.get(image_id, ()):
            center, scale = box_to_center_scale(bbox, input_size)
            people.append(Person(image=path, center=center, scale=scale, joints=None, joints_vis=None,
                                 index=len(people), image_id=image_id, bbox=tuple(float(v) for v in bbox),
                                 score=float(score)))
    return people


def clip_box(box_xywh: Sequence[float], width: float, height: float) -> tuple[float, float, float, float] | None:
    """HRNet's box clipping (``coco.py``): inside the image, ``w - 1`` wide; None when nothing is left.
    Shared by COCO annotations and ``predict``'s detection boxes, so both crop the same person alike."""
    x, y, w, h = (float(v) for v in box_xywh)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1, x1 + max(0.0, w - 1))
    y2 = min(height - 1, y1 + max(0.0, h - 1))
    if x2 >= x1 and y2 >= y1:
        return (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
    return None


# ---- plain folders -----------------------------------------------------------------------------


def _image_files(root: Path) -> list[Path]:
    # Top level only: a damaged MPII/COCO tree must not pass for a folder of unannotated images.
    return sorted(
        p for p in root.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _load_folder(root: Path, input_size: tuple[int, int], skip_missing: bool) -> PoseDataset:
    paths = _image_files(root)
    if not paths:
        raise DataError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)}): point to a folder of images")
    sizes = _image_sizes(paths)
    bad = [p for p, size in zip(paths, sizes) if size is None]
    if bad and not skip_missing:
        raise DataError(
            f"{len(bad)} of {len(paths)} images in {root} cannot be read ({_examples(bad)}): "
            "remove them, or pass --skip-missing to go on without them"
        )
    people = [_whole_image(path, size, i, input_size) for i, (path, size) in enumerate(zip(paths, sizes)) if size]
    if not people:
        raise DataError(f"none of the {len(paths)} images in {root} can be read: check the files")
    return PoseDataset(root, "folder", None, None, people, bad)


def _image_sizes(paths: list[Path]) -> list[tuple[int, int] | None]:
    """(H, W) of each image, None where it does not decode (no header-only reader in OpenCV)."""

    def size(path: Path) -> tuple[int, int] | None:
        try:
            return read_image(path).shape[:2]
        except DataError:
            return None

    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        return list(pool.map(size, paths))


def _whole_image(path: Path, size: tuple[int, int], index: int, input_size: tuple[int, int]) -> Person:
    # The box spans pixel edges -0.5 .. W-0.5: centre (W-1)/2, size W (pixel centres are integers).
    center, scale = whole_image_center_scale(size, input_size)
    return Person(image=path, center=center, scale=scale, joints=None, joints_vis=None, index=index)


# ---- missing images ----------------------------------------------------------------------------


def whole_image_center_scale(size: tuple[int, int], input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The box of a whole H x W image as one person (no padding), grown to the input's aspect ratio."""
    height, width = size
    return box_to_center_scale((-0.5, -0.5, width, height), input_size, padding=1.0)


def _examples(paths: Sequence[Path], limit: int = 3) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _drop_missing(people: list[Person], listed_in: Path, skip_missing: bool) -> tuple[list[Person], list[Path]]:
    if not people:
        raise DataError(f"{listed_in} lists no usable people: check that it is the right annotation file")
    images = list(dict.fromkeys(p.image for p in people))
    missing = [image for image in images if not image.is_file()]
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(images)} images listed in {listed_in} are missing ({_examples(missing)}): "
            "restore them, or pass --skip-missing to go on without them"
        )
    gone = set(missing)
    kept = [p for p in people if p.image not in gone]
    if not kept:
        raise DataError(f"none of the images listed in {listed_in} exist: check the dataset folder")
    return kept, missing
