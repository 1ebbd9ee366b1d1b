"""``agreement``: how closely a second model (an INT8 build) follows a reference model (its float original)
on real person crops, without labels: the reference's keypoints act as the ground truth.

Any people will do: an annotated MPII or COCO split (its people, labels unused), or a plain folder of
photos (each whole image one person, or the people a detector finds: ``boxes``/``detector``). Both models
see the same crops, made and decoded as evaluation makes and decodes them; the measure is
:func:`posequant.benchmarks.metrics.keypoint_agreement` (OKS with the reference as ground truth, and the
share of joints within 2% / 5% of the person size). On 68 COCO people AP moves by about a point from one
harmless change to another; the agreement moves by about 0.01 (docs/ci-gate.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posequant.calibration import box_people, iter_batches, open_dataset
from posequant.core.batching import infer_at_batch
from posequant.core.decoding import head_of
from posequant.core.errors import DataError, PosequantError
from posequant.core.metadata import ModelMeta
from posequant.core.opened import ModelFile, open_model
from posequant.core.numbers import check_number

from .metrics import agreement_sigmas, keypoint_agreement, person_size
from .runners import make_runner, resolve_backend


@dataclass
class AgreementResult:
    reference: str
    model: str
    data: str
    people: int
    flip: bool
    backend: str
    agreement: dict[str, float]  # OKS, OKS_min, within_2%, within_5%, OKS_confident
    worst: list[int]  # indices of the people the model follows least, worst first

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "model": self.model, "data": self.data, "people": self.people,
                "flip": self.flip, "backend": self.backend, "agreement": self.agreement, "worst": self.worst}


def keypoints_on(model: str | Path | ModelFile, people: list, *, backend: str, flip: bool, batch: int = 8
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(N x J x 2 image-pixel keypoints, N x J scores) of ``model`` (a path, or a model opened already) on
    ``people``, cropped and decoded (its head's way) as evaluation does it."""
    model = open_model(model)
    runner = make_runner(backend, onnx_path=model.path, module=None, device="cpu", threads=None, outputs=model.outputs)
    head = head_of(model.meta)
    coords, scores = [], []
    for b in iter_batches(people, model.meta, batch_size=model.batch or batch, flip=flip):
        outputs = infer_at_batch(runner.run, b.inputs, model.batch)
        flipped = infer_at_batch(runner.run, b.inputs_flipped, model.batch) if flip else None
        joints, values = head.decode(outputs, b.centers, b.scales, flipped)
        coords.append(joints)
        scores.append(np.asarray(values).reshape(len(joints), -1))
    return np.concatenate(coords), np.concatenate(scores)


def agreement(
    reference: str | Path,
    model: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    format: str | None = None,
    limit: int | None = None,
    flip: bool = False,
    backend: str | None = None,
    boxes: str | Path | None = None,
    detector: str | Path | None = None,
) -> AgreementResult:
    """The agreement of ``model`` with ``reference`` (same keypoints and input size) on the people of
    ``data``; with ``boxes`` (COCO detection results) or ``detector`` (a person-detector ONNX) a folder's
    photos give one person per box instead of one per image."""
    reference, model, data = Path(reference), Path(model), Path(data)
    if limit is not None:
        limit = int(check_number("limit", limit, minimum=1))
    ref_file, model_file = open_model(reference), open_model(model)  # each opened once
    ref_meta, meta = ref_file.meta, model_file.meta
    if (ref_meta.keypoints, ref_meta.num_joints, ref_meta.input_size) != (meta.keypoints, meta.num_joints,
                                                                          meta.input_size):
        raise PosequantError(f"{model} ({meta.keypoints}, {meta.input_size[0]}x{meta.input_size[1]}) and {reference} "
                             f"({ref_meta.keypoints}, {ref_meta.input_size[0]}x{ref_meta.input_size[1]}) predict "
                             "different things: agreement compares two builds of one model")
    ds = open_dataset(data, input_size=meta.input_size, format=format, split=split)
    people = ds.people
    if boxes is not None or detector is not None:
        people = _boxed_people(ds, meta, boxes, detector)
    people = people[:limit] if limit else people
    if not people:
        raise DataError(f"no people to compare on in {data}")
    backend = resolve_backend(model, backend)
    with tempfile.TemporaryDirectory():
        ref, ref_scores = keypoints_on(ref_file, people, backend=resolve_backend(reference, backend), flip=flip)
        got, _ = keypoints_on(model_file, people, backend=backend, flip=flip)
    size = person_size(np.array([p.scale for p in people]))
    result = keypoint_agreement(ref, got, size, sigmas=agreement_sigmas(meta.keypoints, meta.num_joints),
                                reference_scores=ref_scores)
    d = np.linalg.norm(got - ref, axis=2) / size[:, None]
    worst = [int(i) for i in np.argsort(-np.nan_to_num(d, nan=np.inf).max(axis=1))[:5]]
    return AgreementResult(str(reference), str(model), str(data), len(people), flip, backend, result, worst)


def _boxed_people(ds, meta: ModelMeta, boxes, detector) -> list:
    """One person per box: COCO detection results (``file_name``, or ``image_id`` on a COCO split) or what
    ``detector`` finds on each image (a plain folder's photos, or a split's images)."""
    from posequant.calibration import read_image

    from .detect import DEFAULT_IOU, EVAL_SCORE, coco_boxes, detect_images, open_detector

    if boxes is not None and detector is not None:
        raise PosequantError("give --boxes or --detector, not both")
    images = ds.image_files if ds.format == "coco" else {p.image.name: p.image for p in ds.people}
    if detector is not None:
        found = detect_images(open_detector(detector, score=EVAL_SCORE, iou=DEFAULT_IOU), images, read_image)
    else:
        found = coco_boxes(boxes, images)
    by_image = {k: [(b.bbox, b.score) for b in v] for k, v in found.by_image.items()}
    return box_people({k: p for k, p in images.items() if k in by_image}, by_image, meta.input_size)

