"""Pose metrics as pure functions of arrays: MPII PCKh, COCO keypoint AP, PCK and OKS.

PCKh follows the official MPII protocol as the Simple Baselines / HRNet code implements it
(``lib/dataset/mpii.py::evaluate``, a port of the MATLAB evaluation), with two documented
departures: the "@0.1" figure is the true 0.1 threshold, and degenerate input (zero head box,
joints nobody labelled) gives finite numbers instead of division-by-zero NaN. COCO AP is
pycocotools' ``COCOeval`` itself. The only file these functions touch is the COCO ground-truth
json that ``COCOeval`` needs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from posequant.core.errors import DataError
from posequant.core.keypoints import COCO, COCO_SIGMAS, keypoint_set_for

# ---- MPII PCKh -------------------------------------------------------------------------------

SC_BIAS = 0.6  # head size = 0.6 x head-box diagonal, as the official code
PCKH_THRESHOLDS = (0.5, 0.1)
# The official curve thresholds; OFFICIAL_RNG[11] is 0.11, which the official code reports as "@0.1".
OFFICIAL_RNG = np.arange(0, 0.5 + 0.01, 0.01)
# ``dataset_joints`` of gt_valid.mat, in the order the table and the mean mask rely on.
MPII_GT_JOINTS = (
    "rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor",
    "neck", "head", "rwri", "relb", "rsho", "lsho", "lelb", "lwri",
)
# Table rows: the official code averages a row's two PCKh values unweighted.
PCKH_ROWS = {
    "Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
    "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5),
}
MEAN_EXCLUDED = (6, 7)  # pelvis and thorax (official ``PCKh.mask[6:8]``); upper neck stays in


@dataclass(frozen=True)
class PCKhResult:
    """PCKh in percent: ``table["PCKh@0.5"] == {"Head": .., ..., "Ankle": .., "Mean": ..}``."""

    table: dict[str, dict[str, float]]
    per_joint: dict[str, np.ndarray]  # same keys; (16,) percent, NaN where no joint was evaluable
    joint_count: np.ndarray  # (16,) evaluable joints: labelled, and the person's head box non-zero

    def __getitem__(self, key: str) -> dict[str, float]:
        return self.table[key]


@dataclass(frozen=True)
class PCKhCurve:
    """PCKh (percent) at each threshold: ``per_joint`` is T x 16, ``mean`` the official Mean."""

    thresholds: np.ndarray
    per_joint: np.ndarray
    mean: np.ndarray


def mpii_pckh(
    preds: np.ndarray,
    gt: Mapping[str, Any],
    *,
    one_based: bool,
    thresholds: Sequence[float] = PCKH_THRESHOLDS,
) -> PCKhResult:
    """PCKh of ``preds`` (N x 16 x 2 image coordinates) against ``load_mpii_gt``'s dict.

    ``one_based`` says which pixel convention ``preds`` use: False for coordinates computed in
    Python (0-based), which get +1.0 as the official code does before comparing with the 1-based
    ``pos_gt_src``; True for MATLAB-convention predictions (e.g. an official ``pred.mat``).

    Per joint, over the people where it is labelled: correct when
    ``norm(pred - gt) / (0.6 * norm(headbox[1] - headbox[0])) <= threshold`` (a distance exactly
    at the threshold counts as correct). The table rows average left and right; "Mean" weights
    every joint by its labelled count and leaves out pelvis and thorax (upper neck included).

    Departures from the official code, all on input it mishandles:
    - ``PCKh@0.1`` is at threshold 0.1. The official "Mean@0.1" reads ``pckAll[11]`` of
      ``arange(0, 0.51, 0.01)``, which is the 0.11 bin (see :func:`pckh_curve`).
    - A person whose head box has zero size cannot be scaled; the official code divides by zero.
      Here all their joints are not evaluable, exactly like unlabelled joints.
    - A joint labelled in no person has PCKh NaN (0/0, as official) but no weight in the Mean,
      which official code would turn into NaN.
    """
    scaled, evaluable = _scaled_errors(preds, gt, one_based)
    count = evaluable.sum(axis=1)
    per_joint, table = {}, {}
    for threshold in thresholds:
        key = f"PCKh@{threshold:g}"
        per_joint[key] = _joint_pckh(scaled, evaluable, threshold)
        table[key] = _pckh_table(per_joint[key], count)
    return PCKhResult(table=table, per_joint=per_joint, joint_count=count)


def pckh_curve(
    preds: np.ndarray, gt: Mapping[str, Any], *, one_based: bool, thresholds: np.ndarray = OFFICIAL_RNG
) -> PCKhCurve:
    """PCKh at every threshold of the official ``rng = np.arange(0, 0.5 + 0.01, 0.01)``.

    Row ``i`` is the official ``pckAll[i]``; row 11 is the 0.11 bin, which the official code
    labels "Mean@0.1". Our ``PCKh@0.1`` equals row 10 (exactly 0.1).
    """
    scaled, evaluable = _scaled_errors(preds, gt, one_based)
    count = evaluable.sum(axis=1)
    per_joint = np.stack([_joint_pckh(scaled, evaluable, t) for t in thresholds])
    mean = np.array([_official_mean(row, count) for row in per_joint])
    return PCKhCurve(thresholds=np.asarray(thresholds, dtype=np.float64), per_joint=per_joint, mean=mean)


def _scaled_errors(preds: np.ndarray, gt: Mapping[str, Any], one_based: bool) -> tuple[np.ndarray, np.ndarray]:
    """Errors in head sizes (16 x N, official layout) and which of them count (16 x N bool)."""
    _check_gt_joints(gt)
    pos_gt = np.asarray(gt["pos_gt_src"], dtype=np.float64)
    num_joints, _, num_people = pos_gt.shape
    preds = check_predictions(preds, num_joints)
    if len(preds) != num_people:
        raise DataError(f"{len(preds)} predictions for {num_people} ground-truth people: "
                        "predict every person of the split, in the annotation file's order")
    if not one_based:
        preds = preds + 1.0  # in the predictions' own dtype (float32 usually), as official
    pos_pred = np.transpose(preds, (1, 2, 0)).astype(np.float64)
    boxes = np.asarray(gt["headboxes_src"], dtype=np.float64)
    head_sizes = np.linalg.norm(boxes[1] - boxes[0], axis=0) * SC_BIAS
    evaluable = (np.asarray(gt["jnt_missing"]) == 0) & (head_sizes > 0)
    errors = np.linalg.norm(pos_pred - pos_gt, axis=1)
    # Joints that do not count get inf: no 0/0 warnings, never below a threshold.
    scaled = np.full(errors.shape, np.inf)
    np.divide(errors, head_sizes, out=scaled, where=evaluable)
    return scaled, evaluable


def _check_gt_joints(gt: Mapping[str, Any]) -> None:
    # A reordered file would silently mis-group the table and the Mean mask.
    if "dataset_joints" not in gt:
        return
    names = tuple(str(np.ravel(n)[0]) for n in np.ravel(gt["dataset_joints"]))
    if names != MPII_GT_JOINTS:
        raise DataError(f"MPII ground truth lists joints {', '.join(names)}; expected the official order "
                        f"{', '.join(MPII_GT_JOINTS)}: use the official gt_valid.mat")


def _joint_pckh(scaled: np.ndarray, evaluable: np.ndarray, threshold: float) -> np.ndarray:
    correct = (scaled <= threshold) & evaluable
    count = evaluable.sum(axis=1)
    with np.errstate(invalid="ignore"):  # 0/0 -> NaN for joints nobody labelled, as official
        return 100.0 * correct.sum(axis=1) / count


def _official_mean(per_joint: np.ndarray, count: np.ndarray) -> float:
    """``np.sum(PCKh * jnt_ratio)`` over joints other than pelvis and thorax, as official."""
    included = count > 0
    included[list(MEAN_EXCLUDED)] = False
    if not included.any():
        return float("nan")
    ratio = count[included] / np.sum(count[included]).astype(np.float64)
    return float(np.sum(per_joint[included] * ratio))


def _pckh_table(per_joint: np.ndarray, count: np.ndarray) -> dict[str, float]:
    # mean of two == official 0.5 * (a + b), bit for bit
    table = {name: float(np.mean(per_joint[list(joints)])) for name, joints in PCKH_ROWS.items()}
    table["Mean"] = _official_mean(per_joint, count)
    return table


def check_predictions(preds: Any, num_joints: int, source: str = "predictions") -> np.ndarray:
    """``preds`` as an N x J x 2 numeric array; DataError naming the first NaN/inf person and joint."""
    array = np.asarray(preds)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{source} hold {array.dtype} values, not numbers: save plain x, y coordinates")
    if array.ndim != 3 or array.shape[1:] != (num_joints, 2):
        raise DataError(f"{source} have shape {array.shape}, expected (N, {num_joints}, 2): one x, y per joint and person")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        person, joint, _ = bad[0]
        name = keypoint_set_for(num_joints).joint_names[joint]
        raise DataError(f"{source}: person {person}, joint {joint} ({name}) is {array[person, joint].tolist()} "
                        f"({len(bad)} non-finite values in all): the model or the saved file is broken; regenerate them")
    return array


# ---- PCK and OKS -----------------------------------------------------------------------------


def box_size(bboxes_xywh: np.ndarray) -> np.ndarray:
    """PCK's normaliser: ``max(w, h)`` of each x, y, w, h box (N x 4 -> N)."""
    boxes = np.asarray(bboxes_xywh, dtype=np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2], boxes[:, 3])


def pck(
    preds: np.ndarray,
    gt: np.ndarray,
    visible: np.ndarray,
    norm: np.ndarray,
    *,
    threshold: float = 0.2,
    joint_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """PCK in percent per joint and "Mean": correct when ``norm(pred - gt) <= threshold * norm``.

    ``preds``/``gt`` are N x J x 2, ``visible`` N x J (non-zero = labelled), ``norm`` N: for PCK@0.2
    of the box size, pass :func:`box_size` of the ground-truth boxes (``max(w, h)``). Only visible
    joints count; a person with ``norm`` 0 has none that count. "Mean" pools all counted joints
    (each joint weighted by its count). Joints never counted are NaN.
    """
    preds = check_predictions(preds, np.shape(gt)[1]).astype(np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    if not (len(preds) == len(gt) == len(visible) == len(norm)):
        raise DataError(f"PCK needs one entry per person: {len(preds)} predictions, {len(gt)} ground truths, "
                        f"{len(visible)} visibilities, {len(norm)} norms")
    counted = (np.asarray(visible) > 0) & (norm > 0)[:, None]
    distance = np.linalg.norm(preds - gt, axis=2)
    correct = (distance <= threshold * norm[:, None]) & counted
    names = joint_names or keypoint_set_for(gt.shape[1]).joint_names
    with np.errstate(invalid="ignore"):
        per_joint = 100.0 * correct.sum(axis=0) / counted.sum(axis=0)
    result = {name: float(v) for name, v in zip(names, per_joint)}
    total = counted.sum()
    result["Mean"] = float(100.0 * correct.sum() / total) if total else float("nan")
    return result


def oks(
    preds: np.ndarray, gt: np.ndarray, visible: np.ndarray, area: np.ndarray, sigmas: Sequence[float] = COCO_SIGMAS
) -> np.ndarray:
    """Object keypoint similarity of each pred with its own ground truth (N), as pycocotools.

    ``exp(-d^2 / (2 * area * (2 sigma)^2))`` averaged over the visible joints; NaN for a person
    with none visible (pycocotools then measures to the box instead, which is not modelled here).
    """
    preds = np.asarray(preds, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    variances = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    d2 = np.sum((preds - gt) ** 2, axis=2)
    e = d2 / variances / (np.asarray(area, dtype=np.float64)[:, None] + np.spacing(1)) / 2
    vis = np.asarray(visible) > 0
    with np.errstate(invalid="ignore"):
        return np.sum(np.exp(-e) * vis, axis=1) / vis.sum(axis=1)


# ---- agreement: a second model against a reference, without labels ----------------------------

DEFAULT_SIGMA = 0.063  # the mean of COCO's 17 keypoint sigmas, for joint sets without their own
AGREEMENT_WITHIN = (0.02, 0.05)  # "within 2% / 5% of the person size"
CONFIDENT_SHARE = 0.5  # OKS_confident: the half of the joints the reference scores highest


def person_size(scales: np.ndarray) -> np.ndarray:
    """(N,) the person size of each crop: sqrt(w * h) of its box without the 1.25 padding (the crop box
    is ``scale * 200`` pixels). For a COCO box that is sqrt of the (aspect-fixed) box area."""
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    return np.sqrt(np.prod(scales * 200.0, axis=1)) / 1.25


def keypoint_agreement(
    reference: np.ndarray, test: np.ndarray, size: np.ndarray, *, sigmas: Sequence[float] | None = None,
    reference_scores: np.ndarray | None = None,
) -> dict[str, float]:
    """How closely ``test``'s keypoints follow ``reference``'s (both N x J x 2 image pixels), e.g. an INT8
    model's against its float model's on the same crops: no annotations needed, every joint counts.

    - ``OKS``: the mean over people of COCO's object keypoint similarity with the reference as ground truth,
      ``exp(-d^2 / (2 s^2 (2 sigma)^2))`` averaged over joints, ``s`` the person size (:func:`person_size`;
      s^2 plays COCO's area) and ``sigmas`` the joint set's (COCO's) or :data:`DEFAULT_SIGMA`; 1 = identical;
    - ``OKS_min``: the worst person's; ``within_2%`` / ``within_5%``: the share of joints (percent) no
      farther from the reference than 2% / 5% of the person size.
    - ``OKS_confident`` (with ``reference_scores``, N x J or N x J x 1): the similarity averaged over the
      joints the reference is surest of, those scored at or above the (upper) median of all its scores
      (:data:`CONFIDENT_SHARE`; ranks, so any head's score units will do). The other half (occluded, out of
      the crop, or another joint set's, like an MPII model's on COCO people) is where the reference itself
      guesses: there two harmless builds of one INT8 model already disagree (SimCC's argmax jumps between
      modes), so ``OKS`` moves by about 0.01 from such changes while ``OKS_confident`` stays put.
    A non-finite keypoint on either side counts as infinitely far; a non-finite score as the least sure.
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(test, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64).reshape(-1)
    if ref.ndim != 3 or ref.shape[2] != 2 or got.shape != ref.shape or len(size) != len(ref):
        raise DataError(f"agreement needs two N x J x 2 keypoint arrays and N sizes: {ref.shape}, {got.shape}, "
                        f"{size.shape}")
    if not len(ref):
        raise DataError("agreement needs at least one person")
    if not (np.isfinite(size).all() and (size > 0).all()):
        raise DataError("agreement needs finite person sizes above 0")
    k = 2 * np.asarray(sigmas if sigmas is not None else [DEFAULT_SIGMA] * ref.shape[1], dtype=np.float64)
    if k.shape != (ref.shape[1],):
        raise DataError(f"{k.size} sigmas for {ref.shape[1]} joints")
    d = np.linalg.norm(got - ref, axis=2)
    d = np.where(np.isfinite(d), d, np.inf)
    similarity = np.exp(-(d ** 2) / (2 * size[:, None] ** 2 * k ** 2))
    per_person = similarity.mean(axis=1)
    result = {"OKS": float(per_person.mean()), "OKS_min": float(per_person.min())}
    for t in AGREEMENT_WITHIN:
        result[f"within_{round(100 * t)}%"] = float(100 * (d <= t * size[:, None]).mean())
    if reference_scores is not None:
        scores = np.asarray(reference_scores, dtype=np.float64).reshape(-1)
        if scores.size != d.size:
            raise DataError(f"{scores.size} reference scores for {d.size} joints")
        scores = np.where(np.isfinite(scores), scores, -np.inf)
        sure = scores >= np.quantile(scores, 1 - CONFIDENT_SHARE, method="higher")  # a score itself: -inf is fine
        result["OKS_confident"] = float(similarity.reshape(-1)[sure].mean())
    return result


def agreement_sigmas(keypoints: str | None, num_joints: int) -> Sequence[float] | None:
    """The sigmas :func:`keypoint_agreement` takes for a joint set: COCO's for COCO keypoints, else None (the
    default)."""
    return COCO_SIGMAS if keypoints == "coco" and num_joints == len(COCO_SIGMAS) else None


def agreement_line(a: dict[str, float]) -> str:
    """:func:`keypoint_agreement`'s figures in one line, as quantize and gate print them."""
    sure = f"; the surer half of the joints {a['OKS_confident']:.3f}" if "OKS_confident" in a else ""
    shares = ", ".join(f"{a[f'within_{round(100 * t)}%']:.1f}% within {round(100 * t)}%" for t in AGREEMENT_WITHIN)
    return (f"agreement with float keypoints: OKS {a['OKS']:.3f} (worst person {a['OKS_min']:.3f}{sure}); "
            f"joints {shares} of the person size")


def agreement_of(reference, test, keypoints: str | None = None) -> dict[str, float]:
    """:func:`keypoint_agreement` of two evaluations of the same people (``EvalResult``s), COCO's sigmas for
    COCO keypoints, the reference's joint scores for ``OKS_confident``."""
    sigmas = agreement_sigmas(keypoints, reference.preds.shape[1])
    return keypoint_agreement(reference.preds, test.preds, person_size(reference.scales), sigmas=sigmas,
                              reference_scores=reference.maxvals)


# ---- COCO keypoint AP ------------------------------------------------------------------------

COCO_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
IN_VIS_THRE = 0.2  # HRNet's TEST.IN_VIS_THRE: joints below it do not score the person


@dataclass(frozen=True)
class CocoKeypointAP:
    """pycocotools' ten keypoint stats (0-1; -1 where no ground truth is in the area range)."""

    metrics: dict[str, float]
    summary: str  # what pycocotools printed (its summary table included)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


def rescore(maxvals: np.ndarray, box_scores: Sequence[float] | None = None, *,
            in_vis_thre: float = IN_VIS_THRE) -> np.ndarray:
    """HRNet's person score (``coco.py::evaluate``): the mean of a person's joint maxvals above
    ``in_vis_thre`` (0 when none is) times its box score (1 for ground-truth boxes). N x J(x1) -> N."""
    scores = np.asarray(maxvals, dtype=np.float64).reshape(len(maxvals), -1)
    boxes = np.ones(len(scores)) if box_scores is None else np.asarray(box_scores, dtype=np.float64)
    out = np.zeros(len(scores))
    for i, (s, box_score) in enumerate(zip(scores, boxes)):
        confident = s[s > in_vis_thre]
        out[i] = (float(confident.mean()) if len(confident) else 0.0) * float(box_score)
    return out


def coco_results(
    image_ids: Sequence[Any],
    coords: np.ndarray,
    maxvals: np.ndarray,
    box_scores: Sequence[float] | None = None,
    *,
    in_vis_thre: float = IN_VIS_THRE,
    category_id: int = 1,
) -> list[dict]:
    """COCO keypoint result dicts for N people: ``coords`` N x 17 x 2 (image pixels), ``maxvals``
    N x 17 x 1 (heatmap peaks).

    The person score is HRNet's rescoring (:func:`rescore`). HRNet then runs OKS-NMS per image
    (:func:`detection_results`); with ground-truth boxes every box is a distinct annotated person, so
    that step is skipped here.
    """
    coords = check_predictions(coords, COCO.num_joints, "keypoint coordinates").astype(np.float64)
    scores = np.asarray(maxvals, dtype=np.float64).reshape(len(coords), -1)
    boxes = np.ones(len(coords)) if box_scores is None else np.asarray(box_scores, dtype=np.float64)
    if not (len(image_ids) == len(coords) == len(boxes)) or scores.shape[1] != coords.shape[1]:
        raise DataError(f"COCO results need one image id, {coords.shape[1]} maxvals and one box score per person: "
                        f"got {len(image_ids)} ids, maxvals {np.shape(maxvals)}, {len(boxes)} box scores")
    person_scores = rescore(scores, boxes, in_vis_thre=in_vis_thre)
    results = []
    for image_id, xy, s, person_score in zip(image_ids, coords, scores, person_scores):
        results.append({
            "image_id": image_id.item() if isinstance(image_id, np.generic) else image_id,
            "category_id": category_id,
            "keypoints": np.concatenate([xy, s[:, None]], axis=1).reshape(-1).tolist(),
            "score": float(person_score),
        })
    return results


# ---- OKS-NMS (HRNet's lib/nms/nms.py) ----------------------------------------------------------

OKS_THRE = 0.9  # HRNet's TEST.OKS_THRE


def oks_iou(g: np.ndarray, d: np.ndarray, area_g: float, areas_d: np.ndarray,
            sigmas: Sequence[float] = COCO_SIGMAS) -> np.ndarray:
    """HRNet's ``oks_iou`` (every joint, no visibility threshold, as its ``oks_nms`` calls it): the OKS of
    keypoints ``g`` (J x 2+) with each of ``d`` (K x J x 2+), scaled by the mean of the two areas."""
    variances = (np.asarray(sigmas, dtype=np.float64) * 2) ** 2
    dx = d[:, :, 0] - g[:, 0]
    dy = d[:, :, 1] - g[:, 1]
    mean_area = (area_g + np.asarray(areas_d, dtype=np.float64)) / 2 + np.spacing(1)
    e = (dx ** 2 + dy ** 2) / variances / mean_area[:, None] / 2
    return np.sum(np.exp(-e), axis=1) / e.shape[1]


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, threshold: float = OKS_THRE,
            sigmas: Sequence[float] = COCO_SIGMAS) -> list[int]:
    """HRNet's ``oks_nms``: greedily, best score first, keep a person and drop the others whose OKS with it
    is above ``threshold``. ``keypoints`` K x J x 2+ (image pixels), ``areas`` K (the crop box's area,
    ``prod(scale * 200)``). Returns the kept indices, best first."""
    keypoints = np.asarray(keypoints)
    order = np.asarray(scores).argsort()[::-1]  # as HRNet: numpy's default sort, reversed
    keep = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        overlap = oks_iou(keypoints[i], keypoints[order[1:]], float(areas[i]), np.asarray(areas)[order[1:]], sigmas)
        order = order[np.flatnonzero(overlap <= threshold) + 1]
    return keep


def detection_results(
    image_ids: Sequence[Any],
    coords: np.ndarray,
    maxvals: np.ndarray,
    box_scores: Sequence[float],
    areas: Sequence[float],
    *,
    oks_thre: float = OKS_THRE,
    in_vis_thre: float = IN_VIS_THRE,
) -> tuple[list[dict], list[int]]:
    """COCO keypoint results of people cropped from detection boxes, HRNet's way (``USE_GT_BBOX: false``):
    rescored (:func:`rescore`), then OKS-NMS within each image (:func:`oks_nms` at ``oks_thre``).

    Returns the kept results (images in order of first appearance, each image's people best first, as
    HRNet writes them) and the indices of the kept people in the input.
    """
    results = coco_results(image_ids, coords, maxvals, box_scores, in_vis_thre=in_vis_thre)
    keypoints = np.concatenate([np.asarray(coords, np.float32),
                                np.asarray(maxvals, np.float32).reshape(len(results), -1, 1)], axis=2)
    by_image: dict[Any, list[int]] = {}
    for i, r in enumerate(results):
        by_image.setdefault(r["image_id"], []).append(i)
    kept: list[int] = []
    for members in by_image.values():
        members = np.asarray(members)
        scores = np.array([results[i]["score"] for i in members])
        kept += [int(members[k]) for k in oks_nms(keypoints[members], scores, np.asarray(areas)[members], oks_thre)]
    return [results[i] for i in kept], kept


def coco_keypoint_ap(
    coco_json_path: str | os.PathLike, results: list[dict], *, image_ids: Sequence[Any] | None = None,
    exclude_ann_ids: Sequence[Any] = (),
) -> CocoKeypointAP:
    """pycocotools ``COCOeval(iouType="keypoints")`` of ``results`` against a COCO keypoints json.

    Every image of the json is evaluated, or only ``image_ids`` (with all their annotations) when
    given: people without a result count as missed, so a run over part of the people must name
    its images. Images with no people are fine. ``exclude_ann_ids`` are taken out of the ground
    truth (annotations left out as degenerate). pycocotools' prints are captured into ``summary``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = Path(coco_json_path)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_gt = _load_coco_gt(COCO, path)
        if exclude_ann_ids:
            excluded = set(exclude_ann_ids)
            coco_gt.dataset["annotations"] = [a for a in coco_gt.dataset["annotations"] if a.get("id") not in excluded]
            coco_gt.createIndex()
        _check_results(results, coco_gt, path)
        if image_ids is not None:
            _check_image_ids(image_ids, results, coco_gt, path)
        # loadRes adds fields to the dicts it is given; keep the caller's untouched.
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
        evaluator.params.useSegm = None  # as HRNet's _do_python_keypoint_eval
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats)}
    if not metrics["AP"] >= 0:  # pycocotools' -1: no ground truth to match (all ignored, or lost to id clashes)
        raise DataError(f"{path}: pycocotools found no ground truth to score against (AP {metrics['AP']:g}): "
                        "check that the annotations have keypoints (num_keypoints > 0) and unique ids")
    return CocoKeypointAP(metrics=metrics, summary=log.getvalue())


def _load_coco_gt(coco_class: type, path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} does not exist: pass annotations/person_keypoints_val2017.json")
    try:
        return coco_class(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a COCO annotation file ({type(e).__name__}: {e}): fix or regenerate it") from None


def _check_results(results: list[dict], coco_gt: Any, path: Path) -> None:
    # pycocotools would fail on these with a bare assert or an IndexError.
    if not results:
        raise DataError("no COCO results to evaluate: predict at least one person")
    known = set(coco_gt.getImgIds())
    unknown = sorted({r.get("image_id") for r in results} - known, key=str)
    if unknown:
        raise DataError(f"results name {len(unknown)} image ids that {path} lacks (e.g. {unknown[0]!r}): "
                        "evaluate against the annotation file the people came from")
    lengths = {len(r.get("keypoints", ())) for r in results}
    expected = 3 * len(COCO_SIGMAS)
    if lengths != {expected}:
        raise DataError(f"COCO results must carry {expected} keypoint numbers (x, y, score per joint), "
                        f"got lengths {sorted(lengths)}")


def _check_image_ids(image_ids: Sequence[Any], results: list[dict], coco_gt: Any, path: Path) -> None:
    chosen = set(image_ids)
    unknown = sorted(chosen - set(coco_gt.getImgIds()), key=str)
    if unknown:
        raise DataError(f"image_ids name {len(unknown)} images that {path} lacks (e.g. {unknown[0]!r}): "
                        "evaluate against the annotation file the people came from")
    # A result outside the chosen images would be dropped without a word.
    outside = sorted({r["image_id"] for r in results} - chosen, key=str)
    if outside:
        raise DataError(f"results for {len(outside)} images outside image_ids (e.g. {outside[0]!r}): "
                        "pass the image ids of every evaluated person")


# Below this main metric (COCO AP x 100, MPII PCKh@0.5 Mean) a float model is not being scored at all:
# wrong preprocessing, joint order or data. Trained models score tens of points; a drop measured
# from near zero says nothing about INT8 (the gate refuses to judge, quantize's budget warns).
FLOAT_FLOOR = 5.0


def main_metric(metrics: dict[str, Any]) -> tuple[str, float]:
    """The dataset's main metric in points: COCO AP x 100, MPII PCKh@0.5 Mean (percent)."""
    if "AP" in metrics:
        return "AP", 100.0 * metrics["AP"]
    return "PCKh@0.5", float(metrics["PCKh@0.5"]["Mean"])
