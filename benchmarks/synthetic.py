"""A small COCO-format keypoint set the project makes itself, for demos and tests without real data.

Images are smooth random noise with two people boxes each. The ground truth is the float model's own
predictions (flip off), so the float model scores 100 and what INT8 changes shows up as a drop. It
measures the mechanics and INT8's drift from float, not real accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

BOXES = ([10.0, 10.0, 60.0, 100.0], [80.0, 5.0, 70.0, 110.0])  # x, y, w, h in a 160x120 image
IMAGE_HW = (120, 160)


def _write_split(root: Path, split: str, num_images: int, num_joints: int, rng: np.random.Generator) -> tuple[Path, dict]:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    h, w = IMAGE_HW
    images, anns = [], []
    for i in range(num_images):
        name = f"{i + 1:012d}.jpg"
        noise = rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC))
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for k, box in enumerate(BOXES):
            centre = [box[0] + box[2] / 2, box[1] + box[3] / 2, 2]
            anns.append({"id": 10 * i + k + 1, "image_id": i + 1, "bbox": box, "keypoints": centre * num_joints,
                         "area": box[2] * box[3], "iscrowd": 0, "category_id": 1, "num_keypoints": num_joints})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    ann = root / "annotations" / f"person_keypoints_{split}2017.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(doc))
    return ann, doc


def make_coco_set(root: str | Path, model: str | Path, *, val_images: int = 4, train_images: int = 8,
                  seed: int = 0) -> Path:
    """Write ``root`` as a COCO keypoint set (train and val splits) labelled by ``model`` (a float ONNX
    export with COCO's 17 joints); return ``root``."""
    from posequant.benchmarks.evaluate import evaluate
    from posequant.core.metadata import read_meta

    root = Path(root)
    num_joints = read_meta(model).num_joints
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_images), ("val", val_images)):
        ann, doc = _write_split(root, split, n, num_joints, rng)
        preds = evaluate(model, root, split=split, flip=False).preds
        for a, p in zip(doc["annotations"], preds):
            a["keypoints"] = [float(v) for xy in p for v in (*xy, 2)]
        ann.write_text(json.dumps(doc))
    return root
