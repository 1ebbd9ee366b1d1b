"""``evaluate``: run a pose model over a dataset with the official test-time pipeline, then score it."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration import average_flip, decode_heatmaps, iter_batches, load_mpii_gt, open_dataset
from posequant.errors import DataError, PosequantError
from posequant.metadata import ModelMeta, read_meta

from .metrics import box_size, coco_keypoint_ap, coco_results, mpii_pckh, pck
from .runners import make_runner


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

    @property
    def people_per_s(self) -> float:
        return self.people / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "format": self.format, "split": self.split,
                "people": self.people, "backend": self.backend, "device": self.device, "flip": self.flip,
                "batch": self.batch, "metrics": self.metrics, "seconds": self.seconds,
                "people_per_s": self.people_per_s, "skipped_images": self.skipped}


def _load_model(model: Path, export_options: dict, tmp: Path, progress):
    """(onnx path, meta, torch module or None): a checkpoint is exported (and verified) first."""
    if model.suffix.lower() == ".onnx":
        if not model.is_file():
            raise PosequantError(f"model {model} not found: check the path")
        return model, read_meta(model), None
    from exporter import export_pose

    res = export_pose(model, tmp / "model.onnx", progress=progress, **export_options)
    return res.output, res.meta, res.model.module


def _check_match(meta: ModelMeta, ds) -> None:
    if ds.keypoints is None:
        raise DataError(f"{ds.root} is a plain image folder without annotations: evaluation needs MPII or COCO ground truth")
    if ds.keypoints.num_joints != meta.num_joints:
        raise DataError(f"the model predicts {meta.num_joints} joints ({meta.keypoints}) but {ds.root} is "
                        f"{ds.format.upper()} with {ds.keypoints.num_joints}: evaluate on a matching dataset")


def score(meta: ModelMeta, ds, people, preds: np.ndarray, maxvals: np.ndarray) -> dict[str, Any]:
    """The dataset's standard metrics for the predictions of ``people`` (a prefix of ``ds.people``)."""
    if ds.format == "mpii":
        gt_path = ds.root / "annot" / f"gt_{ds.split}.mat"
        gt = load_mpii_gt(gt_path)
        n_gt = np.shape(gt["pos_gt_src"])[-1]
        if n_gt != len(preds):
            raise DataError(f"{gt_path} has {n_gt} people but {ds.split}.json gave {len(preds)} "
                            "(images skipped?): PCKh needs every annotated person")
        return dict(mpii_pckh(preds, gt, one_based=False).table)
    ap = coco_keypoint_ap(ds.coco_json, coco_results([p.image_id for p in people], preds, maxvals))
    gt = np.stack([p.joints for p in people])
    vis = np.stack([p.joints_vis for p in people])
    norm = box_size(np.stack([p.bbox for p in people]))
    out = {k: ap.metrics[k] for k in ("AP", "AP50", "AP75", "AR")}
    out["PCK@0.2"] = pck(preds, gt, vis, norm, threshold=0.2, joint_names=meta.joint_names)
    return out


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    format: str | None = None,
    flip: bool = True,
    backend: str = "ort",
    device: str = "cpu",
    batch: int = 8,
    limit: int | None = None,
    skip_missing: bool = False,
    threads: int | None = None,
    export_options: dict | None = None,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> EvalResult:
    """Evaluate an .onnx model (its metadata drives preprocessing) or a checkpoint on MPII or COCO."""
    model, data = Path(model), Path(data)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, meta, module = _load_model(model, export_options or {}, Path(tmp), progress)
        ds = open_dataset(data, input_size=meta.input_size, format=format, split=split, skip_missing=skip_missing)
        _check_match(meta, ds)
        if flip and not meta.flip_pairs:
            raise PosequantError(f"{model} has no flip pairs ({meta.keypoints} keypoints): use --no-flip")
        runner = make_runner(backend, onnx_path=onnx_path, module=module, device=device, threads=threads)
        people = ds.people[:limit] if limit else ds.people
        batches = iter_batches(people, meta, batch_size=batch, flip=flip)
        if progress_bar:
            from tqdm import tqdm

            batches = tqdm(batches, total=len(batches), unit="batch", desc="eval", leave=False)
        coords, maxvals = [], []
        t0 = time.perf_counter()
        for b in batches:
            heatmaps = runner.infer(b.inputs)
            if flip:
                heatmaps = average_flip(heatmaps, runner.infer(b.inputs_flipped), meta.flip_pairs)
            c, m = decode_heatmaps(heatmaps, b.centers, b.scales)
            coords.append(c)
            maxvals.append(m)
        seconds = time.perf_counter() - t0
    preds, maxv = np.concatenate(coords), np.concatenate(maxvals)
    # PCKh needs every person of gt_valid.mat, so a --limit run on MPII has no metrics
    metrics = {} if (limit and ds.format == "mpii") else score(meta, ds, people, preds, maxv)
    return EvalResult(str(model), str(data), ds.format, ds.split, len(preds), backend, device, flip, batch,
                      metrics, preds, maxv, seconds, [str(p) for p in ds.skipped])
