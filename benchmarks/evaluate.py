"""``evaluate``: run a pose model over a dataset with the official test-time pipeline, then score it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from posequant.calibration import (
    box_people,
    iter_batches,
    load_mpii_gt,
    open_dataset,
    read_image,
    skipped_image_warnings,
)
from posequant.core.args import Runtime, Whole, checked
from posequant.core.batching import infer_at_batch
from posequant.core.decoding import head_of
from posequant.core.errors import DataError, PosequantError
from posequant.core.fileio import temp_dir
from posequant.core.metadata import ModelMeta
from posequant.core.opened import ModelFile, model_format, open_model
from posequant.core.quiet import warn as posequant_warn

from .detect import DEFAULT_IOU, EVAL_SCORE, PersonBoxes, coco_boxes, detect_images, open_detector
from .metrics import OKS_THRE, box_size, coco_keypoint_ap, coco_results, detection_results, mpii_pckh, pck
from .runners import make_runner, resolve_backend

MPII_PER_PERSON = ("jnt_missing", "pos_gt_src", "headboxes_src")  # last axis: one column per person


class ModelOutputError(PosequantError):
    """The model produced output that cannot be scored (NaN or inf heatmaps or SimCC vectors)."""


@dataclass
class EvalResult:
    model: str
    dataset: str
    format: str
    split: str
    people: int
    backend: str
    device: str
    flip: bool
    batch: int
    metrics: dict[str, Any]
    preds: np.ndarray  # N x J x 2, image pixels, 0-based
    maxvals: np.ndarray  # N x J x 1
    seconds: float
    skipped: list[str] = field(default_factory=list)
    skipped_records: list[str] = field(default_factory=list)  # degenerate ground truth, left out
    # True when the metrics cover only part of the split (--limit, skipped images): scored
    # against just those people (MPII) or just their images (COCO), not the whole split.
    partial: bool = False
    # the person boxes: None for the ground truth's; else where the detection boxes came from, how many
    # were cropped and how many OKS-NMS kept (COCO AP on detector boxes, HRNet's USE_GT_BBOX: false)
    boxes: dict[str, Any] | None = None
    scales: np.ndarray | None = None  # N x 2, each crop's box size / 200 px (metrics.person_size)

    @property
    def people_per_s(self) -> float:
        return self.people / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "format": self.format, "split": self.split,
                "people": self.people, "backend": self.backend, "device": self.device, "flip": self.flip,
                "batch": self.batch, "metrics": self.metrics, "seconds": self.seconds,
                "people_per_s": self.people_per_s, "skipped_images": self.skipped,
                "skipped_records": self.skipped_records, "partial": self.partial,
                "boxes": self.boxes or {"source": "ground truth"}}


def _load_model(model: Path | ModelFile, export_options: dict, tmp: Path, progress) -> tuple[ModelFile, Any]:
    """(the opened model, torch module or None): a checkpoint is exported (and verified) first."""
    if isinstance(model, ModelFile) or model.suffix.lower() == ".onnx" or model_format(model) != "onnx":
        path = model.path if isinstance(model, ModelFile) else model  # ONNX, OpenVINO IR, TensorRT engine
        if not path.is_file():
            raise PosequantError(f"model {path} not found: check the path")
        given = [f"--{k.replace('_', '-')}" for k, v in export_options.items() if v and k != "trust_pickle"]
        if given:  # an ONNX model's preprocessing is its metadata; options would be silently ignored
            raise PosequantError(f"{', '.join(given)} apply to a checkpoint MODEL; {path} is ONNX and is evaluated "
                                 "with its own metadata: to change it, stamp it again with `posequant export-pose`")
        return open_model(model), None
    from posequant.exporter import export_pose

    res = export_pose(model, tmp / "model.onnx", progress=progress, **export_options)
    return ModelFile(res.output, "onnx", res.meta, None), res.model.module


def _check_match(meta: ModelMeta, ds) -> None:
    if ds.keypoints is None:
        raise DataError(f"{ds.root} is a plain image folder without annotations: evaluation needs MPII or COCO ground truth")
    if ds.keypoints.num_joints != meta.num_joints:
        raise DataError(f"the model predicts {meta.num_joints} joints ({meta.keypoints}) but {ds.root} is "
                        f"{ds.format.upper()} with {ds.keypoints.num_joints}: evaluate on a matching dataset")


def mpii_ground_truth(ds) -> dict[str, Any]:
    """``gt_{split}.mat`` of an MPII dataset, checked against the annotation file (one column per record)."""
    gt_path = ds.root / "annot" / f"gt_{ds.split}.mat"
    if not gt_path.is_file():
        raise DataError(f"{gt_path} does not exist: PCKh of the {ds.split!r} split needs the official "
                        "ground truth (annot/gt_valid.mat ships with the MPII annotations)")
    gt = load_mpii_gt(gt_path)
    n_gt = np.shape(gt["pos_gt_src"])[-1]
    if ds.listed is not None and n_gt != ds.listed:
        raise DataError(f"{gt_path} has {n_gt} people but annot/{ds.split}.json lists {ds.listed}: "
                        "they must come from the same release, one gt column per json record")
    return gt


def score_detections(ds, people, preds: np.ndarray, maxvals: np.ndarray, images: list[Any]
                     ) -> tuple[dict[str, Any], int]:
    """COCO AP of people cropped from detection boxes, HRNet's way: rescored, OKS-NMS per image
    (:func:`detection_results`), then pycocotools on ``images`` (every image the boxes were looked for on;
    the whole split when that is all of it). Returns the metrics and how many people OKS-NMS kept."""
    if not people:
        raise DataError(f"no person boxes on the {len(images)} images of {ds.root} {ds.split}: nothing to score "
                        "(lower --det-score, or check the boxes)")
    # HRNet's area: the crop box's, prod(scale * 200) in float32 as its all_boxes[:, 4]
    areas = [float(np.prod(p.scale.astype(np.float32) * np.float32(200))) for p in people]
    results, kept = detection_results([p.image_id for p in people], preds, maxvals, [p.score for p in people], areas)
    whole = len(images) == len(ds.image_files)
    ap = coco_keypoint_ap(ds.coco_json, results, image_ids=None if whole else images,
                          exclude_ann_ids=ds.invalid_ann_ids)
    return {k: ap.metrics[k] for k in ("AP", "AP50", "AP75", "AR")}, len(kept)


def person_boxes(ds, *, boxes: str | Path | PersonBoxes | None = None, detector: str | Path | None = None,
                 det_score: float = EVAL_SCORE, det_iou: float = DEFAULT_IOU, backend: str | None = None,
                 device: str = "cpu", skip_missing: bool = False, progress_bar: bool = False) -> PersonBoxes:
    """The detection boxes of a COCO split: from ``boxes`` (a detection-results JSON, or boxes already made)
    or from running ``detector`` on every image its annotation file lists (in their stored orientation,
    as the ground truth is). Missing or unreadable images are an error, or with ``skip_missing`` left out
    (the scoring then covers the images looked at)."""
    if boxes is not None and detector is not None:
        raise PosequantError("give --boxes (detection results) or --detector (a detector to run), not both")
    if ds.format != "coco":
        raise DataError(f"{ds.root} is {ds.format.upper()}: detection boxes are scored with COCO keypoint AP "
                        "(MPII's PCKh is defined on its annotated people only); give a COCO set")
    if isinstance(boxes, PersonBoxes):
        return boxes
    if boxes is not None:
        return coco_boxes(boxes, ds.image_files)
    found = open_detector(detector, backend=backend, device=device, score=det_score, iou=det_iou)

    def read(path: Path):
        try:
            return read_image(path)
        except DataError:
            if skip_missing:
                return None
            raise DataError(f"cannot run the detector on {path}: the image is missing or unreadable; restore it, "
                            "or pass --skip-missing to go on without it") from None

    return detect_images(found, ds.image_files, read, progress_bar=progress_bar)


def score(meta: ModelMeta, ds, people, preds: np.ndarray, maxvals: np.ndarray, *,
          gt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's standard metrics for the predictions of ``people`` (any subset of ``ds.people``).

    Scored against those people only: MPII takes their columns of ``gt_{split}.mat`` (``gt``,
    loaded when not given), COCO only their images, unless they are all of ``ds.people``.
    """
    if ds.format == "mpii":
        gt = mpii_ground_truth(ds) if gt is None else gt
        columns = [p.index for p in people]
        subset = {k: (np.asarray(gt[k])[..., columns] if k in MPII_PER_PERSON else v) for k, v in gt.items()}
        table = dict(mpii_pckh(preds, subset, one_based=False).table)
        if not np.isfinite(table["PCKh@0.5"]["Mean"]):
            raise DataError(f"no joint of the {len(people)} people in {ds.root} can be scored (none labelled with a "
                            f"non-zero head box in annot/gt_{ds.split}.mat): check the ground truth")
        return table
    image_ids = [p.image_id for p in people]
    # Unpredicted people count as missed: a partial run is scored on its own images only.
    whole = len(people) == len(ds.people) and not ds.skipped
    ap = coco_keypoint_ap(ds.coco_json, coco_results(image_ids, preds, maxvals),
                          image_ids=None if whole else image_ids, exclude_ann_ids=ds.invalid_ann_ids)
    gt = np.stack([p.joints for p in people])
    vis = np.stack([p.joints_vis for p in people])
    norm = box_size(np.stack([p.bbox for p in people]))
    out = {k: ap.metrics[k] for k in ("AP", "AP50", "AP75", "AR")}
    out["PCK@0.2"] = pck(preds, gt, vis, norm, threshold=0.2, joint_names=meta.joint_names)
    return out


@checked(batch=Whole(1), limit=Whole(1, optional=True), threads=Whole(1, optional=True), backend=Runtime(),
         device=Runtime())
def evaluate(
    model: str | Path | ModelFile,
    data: str | Path,
    *,
    split: str | None = None,
    format: str | None = None,
    flip: bool = True,
    backend: str | None = None,
    device: str = "cpu",
    batch: int = 8,
    limit: int | None = None,
    skip_missing: bool = False,
    threads: int | None = None,
    boxes: str | Path | PersonBoxes | None = None,
    detector: str | Path | None = None,
    det_score: float = EVAL_SCORE,
    det_iou: float = DEFAULT_IOU,
    export_options: dict | None = None,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool = False,
    warn: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate an .onnx model (its metadata drives preprocessing and decoding), an OpenVINO IR (.xml, on
    openvino), a TensorRT engine (on tensorrt, cuda), a model opened already (``ModelFile``) or a checkpoint on
    MPII or COCO. ``backend`` None: the model's own (ort for ONNX and checkpoints). Heatmap and SimCC models
    alike: the model's head decodes (``posequant.core.decoding``).

    People whose ground truth is degenerate (see ``open_dataset``) are left out of the run and of
    the scoring, named in one ``warn`` line (a ``PosequantWarning`` when ``warn`` is None) and in
    ``skipped_records``; the result is then ``partial``. Data that cannot be scored at all (no
    joint evaluable, pycocotools' AP -1) raises :class:`DataError` instead of giving a number.

    COCO on detection boxes (``boxes``: a detection-results JSON or :class:`PersonBoxes`; or ``detector``,
    run on every image of the split with ``det_score``/``det_iou``): HRNet's test with ``USE_GT_BBOX:
    false``, one crop per box, rescoring and OKS-NMS, then pycocotools (AP, AP50, AP75, AR; no PCK, which
    needs each person's own ground truth). ``result.boxes`` says which boxes were used.
    """
    say_warning = warn or posequant_warn
    model = model if isinstance(model, ModelFile) else Path(model)
    data = Path(data)
    path = model.path if isinstance(model, ModelFile) else model
    backend = resolve_backend(path, backend)  # None: ort, or the one backend an IR / engine runs on
    with temp_dir() as tmp:
        opened, module = _load_model(model, export_options or {}, Path(tmp), progress)
        meta, head = opened.meta, head_of(opened.meta)
        ds = open_dataset(data, input_size=meta.input_size, format=format, split=split, skip_missing=skip_missing)
        _check_match(meta, ds)
        if flip and not meta.flip_pairs:
            raise PosequantError(f"{model} has no flip pairs ({meta.keypoints} keypoints): use --no-flip")
        gt = mpii_ground_truth(ds) if ds.format == "mpii" else None  # a bad gt file fails before inference
        for message in (ds.invalid_warning(), zero_head_boxes(ds, gt) if gt is not None else None):
            if message:
                say_warning(message)
        found = None
        if boxes is not None or detector is not None:
            if limit:
                raise PosequantError("--limit counts ground-truth people; with --boxes or --detector evaluate the "
                                     "whole split (every box of every image is scored)")
            found = person_boxes(ds, boxes=boxes, detector=detector, det_score=det_score, det_iou=det_iou,
                                 backend="ort" if backend == "torch" else backend, device=device,
                                 skip_missing=skip_missing, progress_bar=progress_bar)
        runner = make_runner(backend, onnx_path=opened.path, module=module, device=device, threads=threads,
                             outputs=opened.outputs)
        fixed = None if module is not None else opened.batch
        if fixed and fixed != batch:  # the file's batch is the only one it runs at
            if progress:
                progress(f"note: {path.name} has a fixed batch of {fixed}: evaluating "
                         + ("one crop at a time" if fixed == 1 else f"{fixed} crops at a time") + f", not --batch {batch}")
            batch = fixed
        people = ds.people[:limit] if limit else ds.people
        if found is not None:  # one person per detection box, cropped as HRNet crops them
            images = {k: p for k, p in ds.image_files.items() if k in found.by_image}
            people = box_people(images, {k: [(b.bbox, b.score) for b in v] for k, v in found.by_image.items()},
                                meta.input_size)
        # --skip-missing also goes on past images that exist but do not decode
        batches = iter_batches(people, meta, batch_size=batch, flip=flip, skip_bad=skip_missing)
        shown = batches
        if progress_bar:
            from tqdm import tqdm

            shown = tqdm(batches, total=len(batches), unit="batch", desc="eval", leave=False)
        done, coords, maxvals = [], [], []
        t0 = time.perf_counter()
        for b in shown:
            outputs = infer_at_batch(runner.run, b.inputs, fixed)
            head.check(outputs, str(path))  # the dims the graph left symbolic
            flipped = infer_at_batch(runner.run, b.inputs_flipped, fixed) if flip else None
            for out in (outputs, flipped):
                if out is not None:
                    _check_finite(out, b.people, path)
            c, m = head.decode(outputs, b.centers, b.scales, flipped)
            done.extend(b.people)
            coords.append(c)
            maxvals.append(m)
        seconds = time.perf_counter() - t0
    skipped = list(dict.fromkeys(str(p) for p in ds.skipped + batches.skipped + (found.skipped if found else [])))
    for line in skipped_image_warnings(skipped):  # --skip-missing: say which, and why
        say_warning(line)
    j = meta.num_joints
    preds = np.concatenate(coords) if coords else np.zeros((0, j, 2), np.float32)
    maxv = np.concatenate(maxvals) if maxvals else np.zeros((0, j, 1), np.float32)
    box_info = None
    if found is None:
        if not done:
            raise DataError(f"none of the {len(people)} people's images in {data} could be read: check the dataset")
        metrics = score(meta, ds, done, preds, maxv, gt=gt)
        partial = len(done) < len(ds.people) or bool(skipped) or bool(ds.invalid)
    else:  # scored on every image the boxes were looked for on, less those that could not be read
        unread = set(map(str, batches.skipped))
        images = [k for k, p in ds.image_files.items() if k in found.by_image and str(p) not in unread]
        metrics, kept = score_detections(ds, done, preds, maxv, images)
        partial = len(images) < len(ds.image_files) or bool(ds.invalid)
        box_info = {**found.to_dict(), "people": len(done), "oks_thre": OKS_THRE, "kept_after_oks_nms": kept}
    return EvalResult(str(path), str(data), ds.format, ds.split, len(preds), backend, device, flip, batch,
                      metrics, preds, maxv, seconds, skipped, list(ds.invalid), partial, box_info,
                      np.array([p.scale for p in done]).reshape(-1, 2))


def zero_head_boxes(ds, gt: dict[str, Any]) -> str | None:
    """A warning naming the people whose head box in gt_{split}.mat has zero size: PCKh cannot scale
    their errors, so none of their joints is scored (official code divides by zero there)."""
    boxes = np.asarray(gt["headboxes_src"], dtype=np.float64)
    zero = np.linalg.norm(boxes[1] - boxes[0], axis=0) == 0
    names = [f"{p.image.name} (record {p.index})" for p in ds.people if zero[p.index]]
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{len(names)} people have a zero-size head box in annot/gt_{ds.split}.mat and are not scored: "
            f"{shown}")


def _check_finite(outputs: tuple[np.ndarray, ...], people, model: Path) -> None:
    # NaN heatmaps decode to finite joints at (0, 0) with NaN scores: garbage metrics, no error.
    bad = np.zeros(len(people), bool)
    for out in outputs:
        bad |= ~np.isfinite(out).reshape(len(out), -1).all(axis=1)
    if bad.any():
        first = people[int(np.argmax(bad))]
        what = "heatmaps" if len(outputs) == 1 else "outputs"
        raise ModelOutputError(f"{model} output NaN or inf {what} for {int(bad.sum())} of {len(people)} people "
                               f"in a batch (first: {first.image}): the model is broken (check its export or quantization)")
